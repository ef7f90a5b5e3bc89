"""Ahead-of-time compile of the grouped MoE kernel for sm_80 / sm_90a, exactly as the launcher launches it
(its ``plan`` constexprs and triton's own specialization, through ``llmq.kernels.moe_cost``): no errors,
no spills, on every path (scale-after-dot with the fp16 exponent trick, bf16 / fp32 dots, the per-row
scale path of small groups and int3, integer and float zeros).

In a subprocess with ``TRITON_INTERPRET`` unset, as tests/kernels/test_kv_attention_aot.py explains
(``tl.cdiv`` and other ``@triton.jit`` helpers are interpreted functions under the interpreter).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmq.kernels.aot import TARGETS

ROOT = Path(__file__).resolve().parents[2]

# name -> (activation, bits, group size, zeros)
CONFIGS = {"int4-g128-sym-fp16": ("fp16", 4, 128, "none"), "int4-g128-int-zeros-fp16": ("fp16", 4, 128, "int"),
           "int4-g128-float-zeros-fp16": ("fp16", 4, 128, "float"), "int4-g128-sym-bf16": ("bf16", 4, 128, "none"),
           "int4-g32-int-zeros-fp16": ("fp16", 4, 32, "int"), "int3-g128-int-zeros-fp16": ("fp16", 3, 128, "int"),
           "int8-g128-sym-bf16": ("bf16", 8, 128, "none"), "int2-g128-int-zeros-fp32": ("fp32", 2, 128, "int")}

_SCRIPT = r'''
import json, sys
from llmq.kernels import moe_cost
from llmq.kernels.cost_cases import compile_and_count

out = {}
shape = moe_cost.SHAPES["qwen3-30b-a3b"]
for name, (act, bits, group, zeros) in json.loads(sys.argv[1]).items():
    for target, cap in json.loads(sys.argv[2]):
        # gate_up on every path; down (a_div = 1 folds to a constant) on the fp16 fast path, sm_90a
        for case, _ in moe_cost.launch_cases(shape, 16, bits, group, zeros, act):
            if case.kernel_name == "moe-down" and (name != "int4-g128-sym-fp16" or cap != 90):
                continue
            use, counts, _ = compile_and_count(case, cap)
            out[f"{name}-{case.kernel_name}-{target}"] = {**use, "constexprs": {k: case.args[k] for k in
                                                          ("SCALE_AFTER_DOT", "MAGIC_F16", "FP32_DOT")}}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def usage():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CONFIGS), json.dumps(TARGETS)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", [t[0] for t in TARGETS])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiles_as_launched_without_spills(usage, config, target):
    for part in ("moe-gate_up", "moe-down"):
        u = usage.get(f"{config}-{part}-{target}")
        if u is None:
            continue
        assert u["stack_bytes"] == 0 and u["local_bytes"] == 0, f"{config} {part} spills on {target}: {u}"
        assert u["registers"] <= 255


def test_the_paths_are_the_ones_meant(usage):
    assert "int4-g128-sym-fp16-moe-down-sm_90a" in usage
    c = {name: usage[f"{name}-moe-gate_up-sm_90a"]["constexprs"] for name in CONFIGS}
    assert c["int4-g128-sym-fp16"] == {"SCALE_AFTER_DOT": True, "MAGIC_F16": True, "FP32_DOT": False}
    assert c["int4-g128-float-zeros-fp16"]["MAGIC_F16"] is False and c["int4-g128-float-zeros-fp16"]["SCALE_AFTER_DOT"]
    assert c["int4-g32-int-zeros-fp16"]["SCALE_AFTER_DOT"] is False
    assert c["int3-g128-int-zeros-fp16"]["SCALE_AFTER_DOT"] is False  # P = 10: 160-feature steps
    assert c["int2-g128-int-zeros-fp32"] == {"SCALE_AFTER_DOT": False, "MAGIC_F16": False, "FP32_DOT": True}
