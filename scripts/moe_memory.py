"""Peak host memory of the layer pipeline on an MoE model whose experts dominate its size.

Builds a random Qwen3-MoE (default: 8 layers, hidden 512, 32 experts of intermediate 512 — the
experts are ~95 % of the weights), saves it (per-expert tensors, as transformers writes them), then
quantizes it in a fresh subprocess per method (``llmq.quantize`` through the layer pipeline, with
``--max-memory`` checked) and reports the peak RSS next to the model's size and the process
baseline (python + torch + transformers imported)::

    python scripts/moe_memory.py --out docs/moe_memory.json
    python scripts/moe_memory.py --methods rtn,gptq,gptq@8 --experts 64 --hidden 1024 --inter 256 --layers 2

``METHOD@C`` runs the method with ``expert_chunk=C`` (statistics of C experts per calibration pass).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import llmq
from llmq.calibration import CalibrationSpec
from llmq.recipes import WeightMethod, WeightRecipe
from llmq.resources import peak_rss_mb
base = peak_rss_mb()
spec, folder, out, max_mb = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
method, _, chunk = spec.partition("@")
args = {"clip_search": False} if method == "gptq" else {}
if chunk:
    args["expert_chunk"] = int(chunk)
recipe = WeightRecipe(bits=4, group_size=128, symmetric=True, method=WeightMethod(method), method_args=args)
r = llmq.quantize(folder, recipe, out_dir=out, progress=False, max_memory_mb=max_mb, device="cpu",
                  calibration=CalibrationSpec(nsamples=int(sys.argv[6]), seqlen=128))
print(json.dumps({"baseline_rss_mb": base, **r.summary.to_dict()}))
"""


_BUILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
from moe_tiny import save_tiny_moe
e, h, i, layers = (int(v) for v in sys.argv[3:7])
model = save_tiny_moe("qwen3_moe", sys.argv[2], num_experts=e, hidden=h, inter=i, layers=layers)
print(json.dumps([sum(p.numel() for p in model.parameters()),
                  sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)]))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--max-memory", type=float, default=4000, help="MB given to --max-memory (checked up front)")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of 128 tokens (gptq)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    # built in its own process: ru_maxrss survives fork + exec on Linux, so a parent that held the model
    # would leak its peak into every measurement child (this parent imports no torch)
    build = subprocess.run([sys.executable, "-c", _BUILD, str(ROOT), str(tmp / "src"), str(a.experts), str(a.hidden),
                            str(a.inter), str(a.layers)], capture_output=True, text=True)
    if build.returncode:
        raise SystemExit(build.stderr[-3000:])
    total, experts = json.loads(build.stdout.strip().splitlines()[-1])
    disk_mb = sum(f.stat().st_size for f in (tmp / "src").glob("*.safetensors")) / 1e6
    rows = {}
    for method in a.methods.split(","):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), method, str(tmp / "src"),
                               str(tmp / f"q-{method.replace('@', '-')}"), str(a.max_memory), str(a.nsamples)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"Qwen3-MoE {a.layers} layers, hidden {a.hidden}, {a.experts} experts x {a.inter}: {total / 1e6:.1f}M "
          f"weights, experts {100 * experts / total:.1f} %, {disk_mb:.0f} MB fp32 on disk")
    print(f"{'method':8s} {'peak RSS MB':>12s} {'baseline MB':>12s} {'peak - base':>12s} {'seconds':>8s} "
          f"{'out MB':>8s}")
    for method, r in rows.items():
        print(f"{method:8s} {r['peak_rss_mb']:12.0f} {r['baseline_rss_mb']:12.0f} "
              f"{r['peak_rss_mb'] - r['baseline_rss_mb']:12.0f} {r['seconds']:8.1f} {r['model_mb_after']:8.1f}")
    if a.out:
        a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "weights": total,
                                     "expert_fraction": experts / total, "disk_mb": disk_mb, "runs": rows},
                                    indent=1))


if __name__ == "__main__":
    main()
