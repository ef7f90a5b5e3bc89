"""``llmq bench``'s CPU measurement, interleaved: one run per weight setting per round, rounds repeated.

On a shared, oversubscribed machine the load drifts by several times within minutes, so settings timed
one after the other (as ``llmq bench`` runs them) compare load levels as much as weights. This builds
every setting once (``llmq.kv.bench.build_model``), then times them round-robin with ``llmq bench``'s own
``run_one`` (prefill ``--context`` random tokens, ``--new-tokens`` decode steps) for ``--rounds`` rounds,
and reports each setting's per-round rates, its median, and its ratio to fp32 *within each round*.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/bench_cpu_interleaved.py --weights fp int8 int4 int4-head8 \
        --rounds 3 --out docs/benchmarks/cpu_backend/bench_cpu_interleaved.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch


def main() -> None:
    from llmq.cli.bench import WEIGHT_CHOICES
    from llmq.kv.bench import build_model, run_one

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--weights", nargs="+", default=["fp", "int8", "int4"], choices=WEIGHT_CHOICES)
    p.add_argument("--kv", default="fp", choices=["fp", "8", "4", "2"])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/bench_cpu_interleaved.json"))
    args = p.parse_args()
    if "fp" not in args.weights:
        raise SystemExit("--weights must include fp: ratios are taken against it within each round")
    models = {w: build_model(args.model, w, torch.device("cpu"), torch.float32)[0] for w in args.weights}
    rounds = []
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        runs = {w: run_one(m, args.kv, args.context, 1, args.new_tokens, 128, 64) for w, m in models.items()}
        rounds.append({"load_start": load, "load_end": os.getloadavg()[0], "runs": runs})
        fp = runs["fp"]
        print(f"round {r + 1} (load {load:.1f} -> {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{w} decode {x['decode_tokens_per_s']:.2f} ({x['decode_tokens_per_s'] / fp['decode_tokens_per_s']:.2f}x) "
            f"prefill {x['prefill_tokens_per_s']:.1f} ({x['prefill_tokens_per_s'] / fp['prefill_tokens_per_s']:.2f}x)"
            for w, x in runs.items()), flush=True)
    summary = {}
    for w in args.weights:
        for what in ("decode", "prefill"):
            key = f"{what}_tokens_per_s"
            ratios = [rd["runs"][w][key] / rd["runs"]["fp"][key] for rd in rounds]
            summary.setdefault(w, {})[what] = {"per_round": [rd["runs"][w][key] for rd in rounds],
                                               "vs_fp32_per_round": ratios, "vs_fp32_median": statistics.median(ratios)}
    meta = {"threads": torch.get_num_threads(), "model": args.model, "kv": args.kv, "context": args.context,
            "new_tokens": args.new_tokens, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rounds}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
