"""Quantization-aware training of SmolLM2-135M by distillation, measured against RTN and saved.

The student starts from round-to-nearest (its scales and integer zeros), trains its latent weights
and scales through fake quantization (STE) to match the float model's next-token distributions on
windows of the BBC *calibration* split, and is converted to packed ``QuantLinear``s. Perplexity is
measured on the same text as the quality table (PEERS.md protocol) for fp32, RTN and QAT.

    python scripts/qat_finetune.py --bits 3 --group 64 --steps 180       # table, results/qat.json + .png
    python scripts/qat_finetune.py ... --out out/smollm2-w3g64-qat       # also save the checkpoint
    python scripts/qat_finetune.py ... --text selection --tokens 8192    # choose settings on held-out text
    python scripts/qat_finetune.py --levels binary --bits 1 --group 64    # non-linear levels (docs/levels.md)

On 2 CPU threads one step (4 windows of 256 tokens) of SmolLM2-135M takes about 8 s, with about
10 GB peak RSS (docs/qat.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=64, help="group size (0 = per channel)")
    p.add_argument("--sym", action="store_true", help="symmetric (default asymmetric, integer zeros)")
    p.add_argument("--levels", default="uniform", choices=["uniform", "nf", "kmeans", "log2", "binary"],
                   help="weight levels (non-uniform levels are symmetric: --sym is implied)")
    p.add_argument("--steps", type=int, default=180, help="AdamW steps (chosen on held-out text)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5, help="latent weights (chosen on held-out text)")
    p.add_argument("--scale-lr", type=float, default=1e-4, help="group scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", choices=["eval", "selection"], default="eval",
                   help="perplexity text: the evaluation text, or held-out calibration-split text for choosing")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="save the QAT checkpoint here")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", type=Path, default=Path("results/qat.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from llmq.api import quantize
    from llmq.calibration import CalibrationSpec, calibration_batch
    from llmq.checkpoint import build_quantization_config, save_quantized
    from llmq.checkpoint.save import check_output_dir
    from llmq.data.bbc import named_text
    from llmq.eval.perplexity import perplexity
    from llmq.model.source import load_model
    from llmq.qat import convert_qat, distill, prepare_qat
    from llmq.recipes import WeightRecipe
    from llmq.resources import peak_rss_mb

    if args.out is not None:
        check_output_dir(args.out, args.force)  # refuse before training, not after
    group = args.group or None
    sym = args.sym or args.levels != "uniform"
    label = f"{args.levels} " if args.levels != "uniform" else ""
    label += f"int{args.bits} g{group or 'channel'}"
    teacher, tok, folder = load_model(args.model)
    text = named_text(args.text)

    def ppl(model) -> float:
        return perplexity(model, tok, text=text, max_tokens=args.tokens, progress=False).perplexity

    spec = CalibrationSpec(nsamples=args.steps * args.batch_size, seqlen=args.seqlen, seed=args.seed)
    windows = calibration_batch(tok, spec)
    rows = {"fp32": ppl(teacher)}
    rtn = copy.deepcopy(teacher)
    quantize(rtn, WeightRecipe(args.bits, group, sym, levels=args.levels), progress=False, device="cpu")
    rows["rtn"] = ppl(rtn)
    del rtn

    method_args = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "scale_lr": args.scale_lr,
                   "loss": "kl_to_float_model", "calibration": spec.to_dict()}
    recipe = WeightRecipe(args.bits, group, sym, method="qat", method_args=method_args, levels=args.levels)
    student = copy.deepcopy(teacher)
    prepare_qat(student, recipe)
    t0 = time.perf_counter()
    result = distill(student, teacher, windows, args.steps, batch_size=args.batch_size, lr=args.lr,
                     scale_lr=args.scale_lr)
    convert_qat(student)
    rows["qat"] = ppl(student)
    record = {"model": str(folder), "levels": args.levels, "bits": args.bits, "group_size": group, "symmetric": sym,
              "text": args.text, "tokens": args.tokens, "perplexity": rows, "train_seconds": time.perf_counter() - t0,
              "losses": result.losses, "method_args": method_args, "peak_rss_mb": peak_rss_mb(),
              "threads": args.threads}
    fp = rows["fp32"]
    print(f"\nSmolLM2-135M {label} {'sym' if sym else 'asym'}, perplexity on "
          f"{args.text} text ({args.tokens} tokens); QAT: {args.steps} steps x {args.batch_size} x {args.seqlen} "
          f"tokens, {record['train_seconds']:.0f} s")
    print("| model | perplexity | vs fp32 |\n|---|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} | {100 * (value / fp - 1):+.1f}% |")
    recovered = (rows["rtn"] - rows["qat"]) / (rows["rtn"] - fp) if rows["rtn"] > fp else float("nan")
    print(f"QAT recovers {100 * recovered:.0f} % of RTN's perplexity increase")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    _plot(result.losses, args.json.with_suffix(".png"), label)
    if args.out is not None:
        save_quantized(student, tok, args.out, build_quantization_config(student, recipe), force=args.force,
                       source_dir=folder)
        print(f"saved to {args.out}")


def _plot(losses: list[float], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(float ‖ fake-quant) per token")
    ax.set_title("SmolLM2-135M QAT by distillation")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
