"""Why KL (TensorRT entropy) calibration is bad for LLM activations: per-Linear thresholds and perplexity.

    PYTHONPATH=. python scripts/kl_audit.py [--calib-samples 8] [--alpha 0.9] [--text selection]
                                            [--tokens 4096] [--out docs/kl_audit]

SmolLM2-135M, SmoothQuant alpha (the static default 0.9), then one calibration pass feeding, for
every selected Linear's input, a min-max, a percentile (99.9999), the KL observer (TensorRT's
published algorithm, zero bins smoothed) and the KL search without smoothing (llmq before
2026-12-04: a level Q leaves empty under P > 0 costs p * 690, i.e. is never chosen). Per input it
reports each threshold, KL's chosen edge i (in bins; the search starts at 128), the share of
values KL clips and the share of the histogram in its first bin. With ``--tokens N > 0`` it also
measures W8A8 static perplexity with each observer's scales (torch int8 reference backend).
Writes ``<out>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from llmq.algorithms.smoothquant import smooth_llama_layers
from llmq.calibration import CalibrationSpec, calibration_batch
from llmq.data.bbc import TEXTS, named_text
from llmq.eval.perplexity import perplexity
from llmq.model.source import load_model, resolve_model_path
from llmq.model.swap import find_linears, set_submodule
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.observers import KLObserver, MinMaxObserver, PercentileObserver
from llmq.w8a8.quantize import collect_input_absmax, run_calibration, w8a8_weight_recipe


class UnsmoothedKL(KLObserver):
    """The search as llmq ran it before the smoothing step was added (for the comparison only)."""

    def _smooth(self, d, inside):
        return d, torch.ones(d.shape[0], dtype=torch.bool, device=d.device)


KINDS = {"minmax": MinMaxObserver, "percentile": lambda: PercentileObserver(99.9999), "kl": KLObserver}
PPL_KINDS = [*KINDS, "kl-unsmoothed"]


def input_key(name: str) -> str:
    """q/k/v read one tensor, gate/up read one tensor: one set of observers for each."""
    parent, leaf = name.rsplit(".", 1)
    return parent + (".qkv" if leaf in ("q_proj", "k_proj", "v_proj") else ".gate_up" if leaf in
                     ("gate_proj", "up_proj") else "." + leaf)


def observe(model, names, batches):
    """``{linear name: {kind: observer}}``; Linears reading one tensor share the same observers."""
    groups = {input_key(n): {k: make() for k, make in KINDS.items()} for n in names}
    first = {}
    for n in names:
        first.setdefault(input_key(n), n)

    def hook(key):
        def fn(_m, args):
            for window in args[0].split(1):
                for o in groups[key].values():
                    o.observe(window)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(k)) for k, n in first.items()]
    try:
        run_calibration(model, batches, "observers", True)
    finally:
        for h in handles:
            h.remove()
    for g in groups.values():  # the unsmoothed search reads the KL observer's own histogram
        g["kl-unsmoothed"] = UnsmoothedKL()
        g["kl-unsmoothed"].__dict__.update(g["kl"].__dict__)
    return {n: groups[input_key(n)] for n in names}


def row(name, o):
    kl = o["kl"]
    hist = kl.hist[0]
    t = {k: float(v.threshold()) for k, v in o.items()}
    edge = round(t["kl"] / float(kl.bin_width[0]))
    edge_u = round(t["kl-unsmoothed"] / float(kl.bin_width[0]))
    total = float(hist.sum())
    occupied = int((hist > 0).nonzero().max()) + 1
    return {"input": name, "absmax": t["minmax"], "percentile": t["percentile"], "kl": t["kl"],
            "kl_unsmoothed": t["kl-unsmoothed"], "kl_edge": edge, "kl_unsmoothed_edge": edge_u,
            "occupied_bins": occupied, "bin0_share": float(hist[0]) / total,
            "kl_clipped_share": float(hist[edge:].sum()) / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--text", choices=list(TEXTS), default="selection")
    ap.add_argument("--tokens", type=int, default=4096, help="perplexity tokens (0: thresholds only)")
    ap.add_argument("--ppl", nargs="*", default=PPL_KINDS, choices=PPL_KINDS,
                    help="observers to measure perplexity for, in this order")
    ap.add_argument("--out", default="results/kl_audit")
    args = ap.parse_args()
    t0 = time.perf_counter()
    fp, tok, _ = load_model(resolve_model_path(args.model), dtype=torch.float32)
    fp.eval()
    names = [n for n, _ in find_linears(fp, w8a8_weight_recipe())]
    batches = list(calibration_batch(tok, CalibrationSpec(nsamples=args.calib_samples, seqlen=512)).split(1))
    with torch.no_grad():
        smooth_llama_layers(fp, collect_input_absmax(fp, names, batches, progress=True), args.alpha)
        obs = observe(fp, names, batches)
    seen, rows = set(), []
    for n in names:  # one row per distinct input tensor
        key = input_key(n)
        if key not in seen:
            seen.add(key)
            rows.append(row(key.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", ""), obs[n]))
    meta = {"model": args.model, "alpha": args.alpha, "calibration_samples": args.calib_samples,
            "calibration_seq_len": 512, "text": args.text, "tokens": args.tokens, "threads": torch.get_num_threads()}
    out = Path(args.out + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ppl: dict[str, float] = {}

    def write():  # after the thresholds, and again after each perplexity (a long run keeps what it has)
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps({"meta": meta, "perplexity": ppl, "rows": rows}, indent=2))

    write()
    print("\n| input | max\\|x\\| | percentile 99.9999 | KL | KL edge i | KL clips | bin-0 share | KL unsmoothed (edge) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['absmax']:.3g} | {r['percentile']:.3g} | {r['kl']:.3g} | {r['kl_edge']} | "
              f"{100 * r['kl_clipped_share']:.4f}% | {100 * r['bin0_share']:.1f}% | "
              f"{r['kl_unsmoothed']:.3g} ({r['kl_unsmoothed_edge']}) |", flush=True)
    if args.tokens > 0:
        for kind in args.ppl:
            q = copy.deepcopy(fp)
            for n in names:
                set_submodule(q, n, W8A8Linear.from_linear(q.get_submodule(n), obs[n][kind].scale(), name=n,
                                                           backend="torch"))
            with torch.no_grad():
                r = perplexity(q, tok, text=named_text(args.text), max_tokens=args.tokens, progress=False)
            ppl[kind] = r.perplexity
            print(f"{kind:14s} ppl {r.perplexity:.3f} ({r.seconds:.0f} s)", flush=True)
            del q
            write()
    print(f"\nperplexity: {json.dumps(ppl)}\n{json.dumps(meta)}\nwrote {out}")


if __name__ == "__main__":
    main()
