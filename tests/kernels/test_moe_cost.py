"""The grouped MoE kernel in the cost report (``llmq.kernels.moe_cost``, ``scripts/kernel_cost.py --moe``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmq.kernels import moe_cost, moe_grouped

ROOT = Path(__file__).resolve().parents[2]


def test_block_m_is_the_launchers():
    from llmq.nn.triton_experts import BLOCK_M

    assert moe_cost.BLOCK_M == BLOCK_M


def test_experts_touched():
    s = moe_cost.SHAPES["qwen3-30b-a3b"]
    assert moe_cost.experts_touched(s, 1) == pytest.approx(s.top_k)
    assert s.top_k < moe_cost.experts_touched(s, 16) < s.experts
    assert moe_cost.experts_touched(s, 10_000) == pytest.approx(s.experts)


def test_cases_are_the_launch():
    """The compiled constexprs are the launcher's plan; only touched experts' bytes count."""
    s = moe_cost.SHAPES["mixtral-8x7b"]
    (gate_up, fp16_gu), (down, _) = moe_cost.launch_cases(s, tokens=1)
    pl = moe_grouped.plan(1 * 2 // 16 + 1 + s.experts, 2 * s.intermediate, s.hidden, 4, 128,
                          gate_up.workload.act_dtype, "none", 16)
    assert pl.constexprs["SCALE_AFTER_DOT"] and pl.constexprs["MAGIC_F16"]
    assert {k: gate_up.args[k] for k in pl.constexprs} == pl.constexprs
    assert gate_up.args["a_div"] == s.top_k and down.args["a_div"] == 1
    per_expert = gate_up.workload.weight_bytes()
    assert 2 * per_expert < gate_up.dram_bytes < 3 * per_expert  # 2 experts of 8 read, plus activations
    assert fp16_gu == pytest.approx(2 * s.hidden * 2 * s.intermediate * 2)


def test_script_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, "scripts/kernel_cost.py", "--moe", "--ms", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * len(moe_cost.SHAPES) and all(not r["error"] for r in rows)
    assert {r["kernel"] for r in rows} == {"moe-gate_up", "moe-down"}
    for r in rows:
        assert r["instr_per_code"] > 0 and r["global_load_bytes_per_thread"] > 0  # LDGSTS (async) or LDG
        assert r["predicted_us"] >= max(r["dram_us"], r["issue_us"]) and r["cublas_fp16_us"] > 0
    assert "| moe-gate_up |" in proc.stdout
