"""Perplexity of an llmq checkpoint in llmq and of its ONNX export in onnxruntime (CPU); sizes on disk.

    PYTHONPATH=. python scripts/eval_onnx.py CKPT [CKPT ...] [--tokens 16384] [--text eval]
                                             [--onnx-dir DIR] [--out results/onnx_eval]

For each checkpoint: ``llmq.onnx.export_onnx`` into ``<onnx-dir>/<name>`` (dynamic axes), then
``llmq.eval.perplexity`` (the same windows, 512 tokens, no BOS, and the same loss) on
``llmq.api.load(CKPT)`` and on ``OnnxCausalLM`` — with onnxruntime's MatMulNBits accuracy level 1
(fp32, what the graph says) and, with ``--ort-default``, also its default level (int8 activations
inside fused 4/8-bit MatMuls). Reports the relative difference and the bytes on disk of the
checkpoint's safetensors and of ``model.onnx``. Writes ``<out>.json`` and a markdown table.

``--decode N`` also exports the KV-cache graph (``kv_cache=True``) and decodes N tokens greedily
from the first 64 tokens of the text, in onnxruntime (presents fed back as pasts) and in llmq
(transformers' own cache), and reports how many of the N tokens agree and each side's tok/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmq.api import load
from llmq.data.bbc import TEXTS, named_text
from llmq.eval.perplexity import perplexity
from llmq.onnx import OnnxCausalLM, export_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--text", choices=list(TEXTS), default="eval")
    ap.add_argument("--onnx-dir", type=Path, default=Path("results/onnx"))
    ap.add_argument("--ort-default", action="store_true", help="also measure onnxruntime's default accuracy level")
    ap.add_argument("--decode", type=int, default=0, metavar="N", help="also greedy-decode N tokens with the KV-cache graph")
    ap.add_argument("--out", default="results/onnx_eval")
    args = ap.parse_args()
    rows = []
    text = named_text(args.text)
    for ckpt in args.checkpoints:
        t0 = time.perf_counter()
        onnx_dir = args.onnx_dir / ckpt.name
        exported = export_onnx(ckpt, onnx_dir, force=True)
        export_s = time.perf_counter() - t0
        model, tok = load(ckpt, dtype=torch.float32)
        with torch.no_grad():
            ref = perplexity(model, tok, text=text, max_tokens=args.tokens, progress=False)
        del model
        runners = {"onnxruntime (accuracy level 1)": OnnxCausalLM(onnx_dir)}
        if args.ort_default:
            runners["onnxruntime (default level)"] = OnnxCausalLM(onnx_dir, accuracy_level=None)
        row = {"checkpoint": str(ckpt), "linears": exported.linears, "tokens": ref.tokens,
               "llmq_perplexity": ref.perplexity, "llmq_seconds": round(ref.seconds, 1),
               "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.glob("*.safetensors")),
               "onnx_bytes": exported.bytes_on_disk, "export_seconds": round(export_s, 1), "onnx": {}}
        for label, runner in runners.items():
            r = perplexity(runner, tok, text=text, max_tokens=args.tokens, progress=False)
            row["onnx"][label] = {"perplexity": r.perplexity, "seconds": round(r.seconds, 1),
                                  "delta_pct": round(100 * (r.perplexity / ref.perplexity - 1), 4)}
            print(f"{ckpt.name}: llmq {ref.perplexity:.4f}  {label} {r.perplexity:.4f} "
                  f"({row['onnx'][label]['delta_pct']:+.3f}%)", flush=True)
        if args.decode:
            row["decode"] = greedy_agreement(ckpt, args.onnx_dir / f"{ckpt.name}-kv", tok, text, args.decode)
            print(f"{ckpt.name}: greedy decode {row['decode']}", flush=True)
        rows.append(row)
    meta = {"tokens": args.tokens, "text": args.text, "window": 512, "threads": torch.get_num_threads()}
    out = Path(args.out + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n| checkpoint | llmq eval | onnxruntime | Δ | checkpoint MB | model.onnx MB |\n|---|---|---|---|---|---|")
    for r in rows:
        for label, o in r["onnx"].items():
            print(f"| {Path(r['checkpoint']).name} | {r['llmq_perplexity']:.4f} | {o['perplexity']:.4f} ({label}) | "
                  f"{o['delta_pct']:+.3f}% | {r['checkpoint_bytes'] / 1e6:.1f} | {r['onnx_bytes'] / 1e6:.1f} |")
    print(f"\n{json.dumps(meta)}\nwrote {out}")


def greedy_agreement(ckpt: Path, onnx_dir: Path, tok, text: str, steps: int) -> dict:
    """Greedy tokens from a 64-token prompt: llmq (the automatic backend, transformers' DynamicCache) vs the
    ONNX KV-cache graph in onnxruntime; counts the agreeing prefix and times each decode loop."""
    export_onnx(ckpt, onnx_dir, force=True, kv_cache=True)
    prompt = tok(text, return_tensors="pt").input_ids[:, :64]
    model, _ = load(ckpt, dtype=torch.float32)
    runs = {}
    for name, lm in (("llmq", model), ("onnxruntime", OnnxCausalLM(onnx_dir))):
        with torch.no_grad():
            out = lm(input_ids=prompt, use_cache=True)
            ids, t0 = [], time.perf_counter()
            for _ in range(steps):
                nxt = out.logits[:, -1:].argmax(-1)
                ids.append(int(nxt))
                out = lm(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            runs[name] = (ids, steps / (time.perf_counter() - t0))
    (a, a_speed), (b, b_speed) = runs["llmq"], runs["onnxruntime"]
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), steps)
    return {"steps": steps, "agreeing_prefix": agree, "llmq_tok_s": round(a_speed, 2), "onnxruntime_tok_s": round(b_speed, 2)}


if __name__ == "__main__":
    main()
