"""Build docs/levels.{json,png} and the markdown table of docs/levels.md from single-run logs.

Each run is ``scripts/eval_quality.py --single METHOD SETTING --levels KIND --also-selection ...``;
its log holds one ``RESULT {json}`` line. The plot puts every level kind's runs (perplexity on the
evaluation text against effective bits per weight, codebooks and scales included) beside the
asymmetric uniform RTN / GPTQ (32 x 512 calibration) rows of docs/quality.json.

    python scripts/levels_report.py LOG [LOG ...]      # merges into docs/levels.json, rewrites the plot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _key(r: dict) -> tuple:
    return (r["method"], r["levels"], r["bits"], r["group_size"], json.dumps(r.get("method_args"), sort_keys=True))


def _label(r: dict) -> str:
    args = r.get("method_args") or {}
    alone = r["method"] == "gptq" and args.get("error_feedback") is False
    method = "nearest (diag-H k-means, no feedback)" if alone else r["method"]
    refit = "" if r["method"] != "gptq" or alone or args.get("refit", True) else ", no refit"
    return f"{r['levels']} {method}{refit}"


def uniform_rows() -> list[dict]:
    rows = json.loads((DOCS / "quality.json").read_text())
    return [r for r in rows if r["method"] in ("rtn", "gptq") and not r.get("symmetric")
            and (r["method"] == "rtn" or (r.get("calibration") or {}).get("nsamples") == 32) and r["bits"] < 8]


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method, style in (("rtn", "k:"), ("gptq", "k--")):
        rs = sorted((r for r in uniform_rows() if r["method"] == method), key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rs], [r["perplexity"] for r in rs], style, marker="x",
                label=f"uniform {method} (asym, g64/g128)")
    for label in dict.fromkeys(_label(r) for r in records):
        rs = sorted((r for r in records if _label(r) == label), key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rs], [r["perplexity"] for r in rs], "o-", label=label)
    ax.axhline(30.05, color="grey", lw=1, label="fp32 (30.05)")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (codes + scales + codebooks)")
    ax.set_ylabel("perplexity (BBC eval text, 16k tokens)")
    ax.set_title("SmolLM2-135M: non-uniform levels vs the uniform grid")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(records: list[dict]) -> str:
    lines = ["| levels | method | bits | group | bits/weight | selection ppl (8k) | eval ppl (16k) | quantize wall "
             "| quantize CPU | load (1 min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (-r["bits"], r["levels"], _label(r))):
        sel = r.get("selection_perplexity")
        lines.append(f"| {r['levels']} | {_label(r).split(' ', 1)[1]} | {r['bits']} | {r['group_size'] or 'channel'} "
                     f"| {r['bits_per_weight']:.2f} | {'–' if sel is None else f'{sel:.2f}'} | {r['perplexity']:.2f} "
                     f"| {r['quantize_s']:.0f} s | {r.get('quantize_cpu_s', 0):.0f} s | "
                     f"{r.get('load_average_1min', 0):.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=DOCS / "levels.json")
    args = p.parse_args()
    records = json.loads(args.out.read_text()) if args.out.exists() else []
    for log in args.logs:
        records += [json.loads(ln[len("RESULT "):]) for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    latest = {_key(r): r for r in records}  # a later run of the same setting replaces an earlier one
    records = list(latest.values())
    args.out.write_text(json.dumps(records, indent=1))
    plot(records, args.out.with_suffix(".png"))
    print(table(records))


if __name__ == "__main__":
    main()
