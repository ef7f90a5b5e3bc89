"""Regenerate the quality table: SmolLM2-135M perplexity per method and setting.

Every run is a fresh subprocess (so its peak RSS is its own): quantize the
float model layer by layer (``llmq.quantize`` on the model folder), then
evaluate ``llmq.eval.perplexity`` on the held-out BBC text (PEERS.md protocol:
first 16,384 tokens, 512-token windows, no BOS). Calibration (GPTQ, AWQ) is
the BBC calibration split (business + sports, odd files), seed 0.

    python scripts/eval_quality.py                       # full table -> results/quality.{json,png}
    python scripts/eval_quality.py --methods gptq --settings 4g64 --nsamples 32   # a quick look

Output: ``results/quality.json`` (one object per run), ``results/quality.png``
(perplexity vs effective bits per weight, one line per method) and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"4g64": (4, 64), "4g128": (4, 128), "3g64": (3, 64), "2g64": (2, 64), "8ch": (8, None)}
# more (bits, group) settings, asked for by name (--settings): the --levels rows of docs/levels.md
EXTRA_SETTINGS = {"4ch": (4, None), "4g256": (4, 256), "3ch": (3, None), "3g256": (3, 256), "3g128": (3, 128),
                  "2ch": (2, None), "2g256": (2, 256), "2g128": (2, 128), "1g64": (1, 64), "1g128": (1, 128),
                  "1ch": (1, None)}
ALL_SETTINGS = {**SETTINGS, **EXTRA_SETTINGS}
METHODS = ("rtn", "gptq", "awq", "hqq")


def run_one(method: str, setting: str, args) -> dict:
    """Quantize + evaluate in this process; returns the JSON record."""
    import torch

    torch.set_num_threads(args.threads)
    from llmq.data.bbc import named_text
    from llmq.eval.perplexity import perplexity
    from llmq.model.source import load_model, resolve_model_path
    from llmq.resources import peak_rss_mb

    folder = resolve_model_path(args.model)
    if method == "fp":
        t0 = time.perf_counter()
        model, tok, _ = load_model(folder)
        rss = peak_rss_mb()
        ppl = perplexity(model, tok, text=named_text(args.text), max_tokens=args.tokens, progress=False)
        return {"method": "fp32", "bits": 32, "group_size": None, "bits_per_weight": 32.0,
                "perplexity": ppl.perplexity, "tokens": ppl.tokens, "text": args.text, "quantize_s": 0.0,
                "peak_rss_mb": rss, "load_s": time.perf_counter() - t0}

    from transformers import AutoTokenizer

    from llmq.calibration import CalibrationSpec, calibration_batch
    from llmq.api import quantize
    from llmq.pipeline import NEEDS_CALIBRATION
    from llmq.recipes import WeightMethod, WeightRecipe

    bits, group = ALL_SETTINGS[setting]
    t0, c0 = time.perf_counter(), _cpu_s()
    ids, spec = None, None
    if WeightMethod(method) in NEEDS_CALIBRATION:
        n = args.awq_nsamples if method == "awq" else args.nsamples
        spec = CalibrationSpec(nsamples=n, seqlen=args.seqlen, seed=0)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = calibration_batch(tok, spec)
    from llmq.cli.quantize import parse_method_args

    recipe = WeightRecipe(bits=bits, group_size=group, symmetric=args.sym or args.levels != "uniform", method=method,
                          zero_point=args.zero_point, method_args=parse_method_args(args.method_arg),
                          levels=args.levels)
    result = quantize(folder, recipe, progress=False, calibration_ids=ids)
    model, summary = result.model, result.summary
    quant_s, quant_cpu = time.perf_counter() - t0, _cpu_s() - c0
    rss = peak_rss_mb()
    tok = AutoTokenizer.from_pretrained(folder)
    extra = {}
    if args.also_selection:  # one quantization, both texts: settings are chosen on the selection text
        sel = perplexity(model, tok, text=named_text("selection"), max_tokens=8192, progress=False)
        extra = {"selection_perplexity": sel.perplexity, "selection_tokens": sel.tokens}
    ppl = perplexity(model, tok, text=named_text(args.text), max_tokens=args.tokens, progress=False)
    return {**extra, "method": method, "bits": bits, "group_size": group, "symmetric": args.sym,
            "zero_point": None if recipe.zero_point is None else recipe.zero_point.value, "levels": args.levels,
            "bits_per_weight": summary.bits_per_weight, "perplexity": ppl.perplexity, "tokens": ppl.tokens,
            "text": args.text, "method_args": recipe.method_args,
            "quantize_s": quant_s, "quantize_cpu_s": quant_cpu, "peak_rss_mb": rss, "threads": args.threads,
            "load_average_1min": os.getloadavg()[0],
            "calibration": spec.to_dict() if spec else None}


def _setting_of(r: dict) -> str:
    if r["method"] == "fp32":
        return "-"
    return next(k for k, v in ALL_SETTINGS.items() if v == (r["bits"], r["group_size"]))


def _order(r: dict):
    methods = ("fp32",) + METHODS
    return (list(ALL_SETTINGS).index(_setting_of(r)) if r["method"] != "fp32" else -1, methods.index(r["method"]),
            bool(r.get("symmetric")), _zero(r) or "", (r.get("calibration") or {}).get("nsamples") or 0)


def _zero(r: dict) -> str | None:
    """The run's zero-point kind; records from before float zeros existed (no key) used integer zeros."""
    if r["method"] == "fp32" or r.get("symmetric"):
        return None
    return r.get("zero_point") or "int"


def _label(r: dict) -> str:
    """Method name, with ``(sym)`` for symmetric runs (every other run is asymmetric) and the zero-point
    kind where it is not the method's default (HQQ at 2-4 bits: float, otherwise int); ``+levels`` for
    non-uniform levels (and ``[KEY=VALUE]`` for their method arguments)."""
    if r.get("levels", "uniform") != "uniform":
        extra = ",".join(f"{k}={v}" for k, v in sorted((r.get("method_args") or {}).items()))
        return f"{r['method']}+{r['levels']}" + (f" [{extra}]" if extra else "")
    if r.get("symmetric"):
        return f"{r['method']} (sym)"
    zero = _zero(r)
    if zero is None:  # fp32
        return r["method"]
    from llmq.recipes import WeightMethod, default_zero_point

    default = default_zero_point(WeightMethod(r["method"]), r["bits"]).value
    return r["method"] if zero == default else f"{r['method']} ({zero} zeros)"


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all threads): the cost on a machine shared with others."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fp = next((r for r in records if r["method"] == "fp32"), None)
    for method in METHODS:
        for label in dict.fromkeys(_label(r) for r in records if r["method"] == method):
            rs = sorted((r for r in records if r["method"] == method and _label(r) == label),
                        key=lambda r: r["bits_per_weight"])
            style = "s:" if rs[0].get("symmetric") else ("o-" if label == method else "^--")
            ax.plot([r["bits_per_weight"] for r in rs], [r["perplexity"] for r in rs], style, label=label)
    if fp:
        ax.axhline(fp["perplexity"], color="k", ls="--", lw=1, label=f"fp32 ({fp['perplexity']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (scales and zeros included)")
    ax.set_ylabel("perplexity (BBC eval, 16k tokens)")
    ax.set_title("SmolLM2-135M: perplexity vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(records: list[dict]) -> str:
    fp = next((r["perplexity"] for r in records if r["method"] == "fp32"), None)
    lines = ["| method | bits | group | calibration | bits/weight | perplexity | Δ vs fp | quantize wall | quantize CPU "
             "| peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        delta = "–" if fp is None or r["method"] == "fp32" else f"{100 * (r['perplexity'] / fp - 1):+.1f}%"
        g = "–" if r["method"] == "fp32" else (r["group_size"] or "channel")
        cal = r.get("calibration")
        cal = f"{cal['nsamples']} x {cal['seqlen']}" if cal else "–"
        lines.append(f"| {_label(r)} | {r['bits']} | {g} | {cal} | {r['bits_per_weight']:.2f} | {r['perplexity']:.2f} | "
                     f"{delta} | {r['quantize_s']:.1f} s | {r.get('quantize_cpu_s', 0.0):.1f} s | "
                     f"{r['peak_rss_mb'] / 1e3:.2f} GB |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(ALL_SETTINGS))
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows (PEERS: 128)")
    p.add_argument("--awq-nsamples", type=int, default=128, help="AWQ calibration windows")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--text", choices=["eval", "selection"], default="eval",
                   help="evaluation text (default) or the selection text defaults are chosen on: the "
                   "calibration articles, used with --tokens 8192 (docs/quality.md's 'held-out text')")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (use --threads 1 with --jobs > 1)")
    p.add_argument("--no-fp", action="store_true", help="skip the fp32 baseline row")
    p.add_argument("--out", type=Path, default=Path("results/quality.json"))
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out, do the rest")
    p.add_argument("--report", nargs="*", type=Path, metavar="LOG",
                   help="only rebuild the table and plot from --out, adding RESULT lines of these single-run logs "
                   "(a later record replaces an earlier one of the same method, setting and calibration size)")
    p.add_argument("--sym", action="store_true", help="symmetric weights (default: asymmetric, like the table)")
    p.add_argument("--zero-point", choices=["int", "float"], default=None,
                   help="asymmetric zero points (default: the method's own, float for hqq, int otherwise)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm parameter for every quantized run, as `llmq quantize --method-arg`")
    p.add_argument("--levels", default="uniform", choices=["uniform", "nf", "kmeans", "log2", "binary"],
                   help="weight levels (llmq quantize --levels; non-uniform levels are symmetric): docs/levels.md")
    p.add_argument("--also-selection", action="store_true",
                   help="also evaluate each quantized model on the selection text (8,192 tokens) in the same run")
    p.add_argument("--single", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print("RESULT " + json.dumps(run_one(*args.single, args)), flush=True)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.report is not None:
        records = json.loads(args.out.read_text()) if args.out.exists() else []
        for log in args.report:
            records += [json.loads(ln[len("RESULT "):]) for ln in log.read_text().splitlines()
                        if ln.startswith("RESULT ")]
        latest = {}
        for r in records:
            latest[(r["method"], _setting_of(r), _label(r),
                    (r.get("calibration") or {}).get("nsamples"))] = r
        records = sorted(latest.values(), key=_order)
        args.out.write_text(json.dumps(records, indent=1))
        plot(records, args.out.with_suffix(".png"))
        print(table(records))
        return
    runs = ([] if args.no_fp else [("fp", "-")]) + [(m, s) for s in args.settings for m in args.methods]
    records: list[dict] = []
    if args.out.exists() and args.resume:
        records = json.loads(args.out.read_text())
        done = {(r["method"].replace("fp32", "fp"), _setting_of(r)) for r in records
                if r["method"] == "fp32" or (bool(r.get("symmetric")) == args.sym
                                             and (args.zero_point is None or _zero(r) == args.zero_point))}
        runs = [r for r in runs if r not in done]
    passthrough = ["--model", args.model, "--nsamples", str(args.nsamples), "--awq-nsamples",
                   str(args.awq_nsamples), "--seqlen", str(args.seqlen), "--tokens", str(args.tokens),
                   "--threads", str(args.threads), "--text", args.text] + (["--sym"] if args.sym else []) + (
                   ["--zero-point", args.zero_point] if args.zero_point else []) + [
                   f"--method-arg={a}" for a in args.method_arg] + ["--levels", args.levels] + (
                   ["--also-selection"] if args.also_selection else [])
    # --jobs runs several single-threaded subprocesses at once (each still reports its own peak RSS)
    from concurrent.futures import ThreadPoolExecutor, as_completed

    def launch(run):
        method, setting = run
        cmd = [sys.executable, __file__, "--single", method, setting, *passthrough]
        return run, subprocess.run(cmd, capture_output=True, text=True, env=os.environ)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(launch, run) for run in runs]):
            (method, setting), proc = future.result()
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{method} {setting} FAILED:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            rec = json.loads(line[len("RESULT "):])
            records.append(rec)
            print(f"{method:5s} {setting:6s} ppl {rec['perplexity']:10.2f}  {rec['quantize_s']:7.1f} s "
                  f"(cpu {rec.get('quantize_cpu_s', 0):7.1f} s) {rec['peak_rss_mb']:7.0f} MB", flush=True)
            args.out.write_text(json.dumps(records, indent=1))
    plot(records, args.out.with_suffix(".png"))
    print(table(records))


if __name__ == "__main__":
    main()
