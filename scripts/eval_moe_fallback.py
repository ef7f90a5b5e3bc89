"""Which fallback serves an MoE expert that saw too few calibration tokens: RTN, or GPTQ/AWQ on pooled statistics?

A tiny random Qwen3-MoE (or Mixtral) with many experts is quantized (experts only, int4 group 32)
with a calibration set so small that most experts get only a handful of routed tokens, under:

    rtn          plain round-to-nearest for every expert (the baseline)
    own          the method on each expert's own tokens, however few (expert_min_tokens=0)
    fallback=rtn every expert below the threshold: RTN
    fallback=pooled every expert below the threshold: the method with the block's pooled statistics

and the held-out logit MSE against the float model is reported (mean over seeds). Writes a table
to stdout and JSON to ``--out``::

    python scripts/eval_moe_fallback.py --family qwen3_moe --out docs/moe_fallback.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from llmq.pipeline import WeightQuantizer, run_layerwise  # noqa: E402  (the tiny folders have no tokenizer)
from llmq.recipes import WeightMethod, WeightRecipe  # noqa: E402
from moe_tiny import tiny_moe  # noqa: E402


def held_out_mse(model, ref, ids) -> float:
    with torch.no_grad():
        return (model(ids).logits - ref(ids).logits).pow(2).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "mixtral"])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--calib", default="4x16", help="calibration windows x tokens (default 4x16: ~8 pairs/expert)")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="gptq,awq")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    n, t = (int(v) for v in a.calib.split("x"))
    rows = []
    for seed in range(a.seeds):
        model = tiny_moe(a.family, num_experts=a.experts, seed=seed)
        folder = Path(tempfile.mkdtemp()) / "src"
        model.save_pretrained(folder)
        torch.manual_seed(100 + seed)
        calib, held_out = torch.randint(0, 128, (n, t)), torch.randint(0, 128, (16, 32))
        base = dict(bits=4, group_size=32, symmetric=False, include=("*experts*",))
        q, _ = run_layerwise(folder, WeightQuantizer(WeightRecipe(**base)), None, device="cpu", progress=False)
        rows.append({"seed": seed, "variant": "rtn", "mse": held_out_mse(q, model, held_out)})
        for method in a.methods.split(","):
            variants = {"own": {"expert_min_tokens": 0},
                        "fallback=rtn": {"expert_min_tokens": a.min_tokens, "expert_fallback": "rtn"},
                        "fallback=pooled": {"expert_min_tokens": a.min_tokens, "expert_fallback": "pooled"}}
            for name, args in variants.items():
                t0 = time.perf_counter()
                recipe = WeightRecipe(**base, method=WeightMethod(method), method_args=args)
                q, s = run_layerwise(folder, WeightQuantizer(recipe), calib, device="cpu", progress=False)
                fell = sum(len(v["experts"]) for v in s.expert_fallbacks.values())
                rows.append({"seed": seed, "variant": f"{method} {name}", "mse": held_out_mse(q, model, held_out),
                             "fell_back": fell, "seconds": time.perf_counter() - t0})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    summary = {}
    print(f"{a.family}, {a.experts} experts top-2, calibration {a.calib} tokens, threshold {a.min_tokens}, "
          f"{a.seeds} seeds; held-out logit MSE (lower is better)")
    for v in variants:
        mses = [r["mse"] for r in rows if r["variant"] == v]
        fell = [r.get("fell_back", 0) for r in rows if r["variant"] == v]
        summary[v] = {"mse_mean": sum(mses) / len(mses), "fell_back_mean": sum(fell) / len(fell)}
        print(f"  {v:24s} {summary[v]['mse_mean']:.3e}   experts fallen back (of {2 * a.experts}) "
              f"{summary[v]['fell_back_mean']:.1f}")
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "summary": summary,
                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
