"""The LUT kernels' cost report (``scripts/kernel_cost.py --lut``, ``kernels/lut_cost.py``) end to end: every
LUT kernel config compiled for sm_90a as launched, with no register spills, and the decode hot loop's
instructions per code against the uniform kernel's at the same bits. Runs in a subprocess (compiling needs
``TRITON_INTERPRET`` unset) with the running interpreter's triton: CI's 3.9, and 3.6 through
``scripts/test_oldest.sh`` / ``.venv-oldest``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("lut") / "lut_cost.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_cost.py"), "--lut", "--bits", "1", "2", "3",
                           "4", "--shapes", "4096x4096", "--ms", "1", "16", "4096", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_config_compiles_without_spills(rows):
    assert len(rows) == 4 * 2 * 3  # bits x table kinds x M
    assert {(r["bits"], r["table"]) for r in rows} == {(b, k) for b in (1, 2, 3, 4) for k in ("shared", "column")}
    bad = [f"{r['config']} int{r['bits']} M={r['M']}: {r['error'] or 'stack=%d local=%d' % (r['stack_bytes'], r['local_bytes'])}"
           for r in rows if r["error"] or r["stack_bytes"] or r["local_bytes"]]
    assert not bad, f"triton {triton.__version__}: " + "; ".join(bad)


# Misses of the 1.5x target (docs/kernels_lut.md): 4-bit by a few percent (1.53-1.55x on sm_90a); 3-bit since
# uniform fp16 int3 moved onto the fp16x2 path (11.05 -> 3.86 instr/code), 1.69-1.71x. These bounds only guard
# against regressions there; 1 and 2 bits are held to the target.
MISSED_BOUND = {3: 1.75, 4: 1.6}


def test_decode_within_target_of_uniform(rows):
    """Issue 19: the decode hot loop (M = 1, fp16) within 1.5x of the uniform kernel's instr/code."""
    from llmq.kernels.lut_cost import TARGET_RATIO
    decode = [r for r in rows if r["M"] == 1]
    assert all(r["config"].startswith("packed") for r in decode)  # the register-table path is what is counted
    over = {(r["bits"], r["table"]): round(r["ratio"], 2) for r in decode
            if r["ratio"] > MISSED_BOUND.get(r["bits"], TARGET_RATIO)}
    assert not over, f"triton {triton.__version__}: over the bound vs the uniform kernel: {over}"
