"""SmolLM2-135M perplexity: fp32, weight-only int8, W8A8 dynamic and static (every observer), +/- SmoothQuant.

    python scripts/eval_w8a8.py [--tokens 16384] [--calib-samples 32] [--alpha 0.5] [--out results/w8a8]

Protocol: llmq.eval.perplexity (PEERS.md: BBC tech+politics even files, 512-token
windows, no BOS); calibration: llmq.calibration.calibration_batch (BBC business+sports
odd files, seed 0). W8A8 runs the exact torch int8 reference backend on CPU.
To keep the run short, calibration statistics are gathered once per model variant
(fp / smoothed) with all five observers fed in the same pass — the same numbers
``quantize_model_w8a8`` gives per observer. Writes ``<out>.json`` and a markdown
table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from llmq.algorithms.smoothquant import smooth_llama_layers
from llmq.api import quantize
from llmq.calibration import CalibrationSpec, calibration_batch
from llmq.data.bbc import TEXTS, named_text
from llmq.eval.perplexity import perplexity
from llmq.model.source import load_model, resolve_model_path
from llmq.model.swap import find_linears, set_submodule
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.observers import make_observer
from llmq.recipes import ObserverKind, WeightRecipe
from llmq.w8a8.quantize import collect_input_absmax, run_calibration, w8a8_weight_recipe

OBSERVERS = [k.value for k in ObserverKind]


def observe_all(model, names, batches, percentile, momentum, kinds=OBSERVERS):
    """{kind: {linear name: scale}} from one calibration pass feeding every observer kind in ``kinds``."""
    obs = {n: {k: make_observer(k, percentile=percentile, momentum=momentum) for k in kinds} for n in names}

    def hook(name):
        def fn(_m, args):
            for o in obs[name].values():
                o.observe(args[0])
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        run_calibration(model, batches, "observers", True)
    finally:
        for h in handles:
            h.remove()
    return {k: {n: obs[n][k].scale() for n in names} for k in kinds}


def to_w8a8(model, names, scales=None):
    q = copy.deepcopy(model)
    for n in names:
        set_submodule(q, n, W8A8Linear.from_linear(q.get_submodule(n), None if scales is None else scales[n], name=n,
                                                   backend="torch"))
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--text", choices=list(TEXTS), default="eval",
                    help="evaluation text (default) or the selection text defaults are chosen on (the "
                    "calibration articles; docs/w8a8.md's 'held-out text', used with --tokens 8192)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--percentile", type=float, default=99.9999)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--only", nargs="*", default=None, help="subset of rows, e.g. fp w8a8-dynamic-sq")
    ap.add_argument("--out", default="results/w8a8")
    args = ap.parse_args()
    torch.manual_seed(0)

    fp, tok, _ = load_model(resolve_model_path(args.model), dtype=torch.float32)
    fp.eval()
    names = [n for n, _ in find_linears(fp, w8a8_weight_recipe())]
    batches = list(calibration_batch(tok, CalibrationSpec(nsamples=args.calib_samples, seqlen=512)).split(1))
    rows: list[dict] = []
    t_start = time.perf_counter()

    def want(key):
        return args.only is None or key in args.only

    def evaluate(key, label, model, **extra):
        r = perplexity(model, tok, text=named_text(args.text), max_tokens=args.tokens, progress=False)
        rows.append({"key": key, "config": label, "perplexity": r.perplexity, "tokens": r.tokens,
                     "eval_seconds": round(r.seconds, 1), **extra})
        print(f"{label:45s} ppl {r.perplexity:8.3f}  ({r.seconds:.0f} s)", flush=True)

    with torch.no_grad():
        if want("fp"):
            evaluate("fp", "fp32", fp)
        if want("int8-wo"):
            wo = copy.deepcopy(fp)
            quantize(wo, WeightRecipe(bits=8, group_size=None, symmetric=True), progress=False, device="cpu")
            evaluate("int8-wo", "int8 weight-only (RTN, per channel, sym)", wo)
            del wo
        variants = [("", fp, "no SQ")]
        if args.only is None or any(k.endswith("-sq") for k in args.only):
            smooth = copy.deepcopy(fp)
            stats = collect_input_absmax(smooth, names, batches, progress=True)
            smooth_llama_layers(smooth, stats, args.alpha)
            variants.append(("-sq", smooth, f"SQ a={args.alpha}"))
        for suffix, base, sq in variants:
            if want(f"w8a8-dynamic{suffix}"):
                evaluate(f"w8a8-dynamic{suffix}", f"W8A8 dynamic per-token, {sq}", to_w8a8(base, names),
                         scheme="dynamic", smoothquant=suffix == "-sq")
            keys = [f"w8a8-static-{k}{suffix}" for k in OBSERVERS]
            if any(want(k) for k in keys):
                kinds = [k for k, key in zip(OBSERVERS, keys) if want(key)]
                scales = observe_all(base, names, batches, args.percentile, args.momentum, kinds)
                for kind, key in zip(OBSERVERS, keys):
                    if want(key):
                        evaluate(key, f"W8A8 static per-tensor {kind}, {sq}", to_w8a8(base, names, scales[kind]),
                                 scheme="static", observer=kind, smoothquant=suffix == "-sq")

    fp_ppl = next((r["perplexity"] for r in rows if r["key"] == "fp"), None)
    for r in rows:
        r["delta_vs_fp_pct"] = None if fp_ppl is None else round(100 * (r["perplexity"] / fp_ppl - 1), 2)
    meta = {"model": args.model, "tokens": args.tokens, "window": 512, "text": args.text, "calibration_samples": args.calib_samples,
            "calibration_seq_len": 512, "alpha": args.alpha, "percentile": args.percentile,
            "momentum": args.momentum, "backend": "torch (exact int8 reference), CPU",
            "threads": torch.get_num_threads(), "total_seconds": round(time.perf_counter() - t_start, 1)}
    out = Path(args.out + ".json")  # not with_suffix: "--out results/pct99.99" must keep its dots
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n| config | perplexity | Δ vs fp32 |\n|---|---|---|")
    for r in rows:
        d = "–" if r["delta_vs_fp_pct"] is None or r["key"] == "fp" else f"{r['delta_vs_fp_pct']:+.2f}%"
        print(f"| {r['config']} | {r['perplexity']:.3f} | {d} |")
    print(f"\n{json.dumps(meta)}\nwrote {out}")


if __name__ == "__main__":
    main()
