"""Ahead-of-time compile of the grouped MoE kernel for sm_80 / sm_90a: no errors, no spills.

In a subprocess with ``TRITON_INTERPRET=0``, as tests/kernels/test_kv_attention_aot.py explains
(``tl.cdiv`` and other ``@triton.jit`` helpers are interpreted functions under the interpreter).
"""

import json
import os
import subprocess
import sys

import pytest

from llmq.kernels.aot import TARGETS

# name -> (activation, BITS, ZERO_MODE)
CONFIGS = {"int4-asym-fp16": ("fp16", 4, 1), "int4-sym-bf16": ("bf16", 4, 0), "int3-asym-fp16": ("fp16", 3, 1),
           "int8-sym-bf16": ("bf16", 8, 0), "int2-asym-fp32": ("fp32", 2, 1)}

_SCRIPT = r'''
import json, sys
from llmq.kernels.aot import TARGETS, compile_kernel, resource_usage
from llmq.kernels.moe_grouped import BLOCK_K, moe_grouped_kernel
from llmq.nn.triton_experts import BLOCK_M
from llmq.quant.packing import codes_per_word

out = {}
for target, cap in TARGETS:
    for name, (act, bits, zero_mode) in json.loads(sys.argv[1]).items():
        sig = {"a_ptr": f"*{act}", "sorted_ptr": "*i32", "expert_ptr": "*i32", "qw_ptr": "*i32", "s_ptr": "*fp16",
               "z_ptr": "*u8" if zero_mode else "*fp16", "out_ptr": f"*{act}"}
        for n in ("num_pairs", "N", "K", "group_size", "num_groups", "packed_rows", "a_div", "stride_am",
                  "stride_om"):
            sig[n] = "i32"
        meta = {"BITS": bits, "P": codes_per_word(bits), "ZERO_MODE": zero_mode, "FP32_DOT": act == "fp32",
                "BLOCK_M": BLOCK_M, "BLOCK_N": 64, "BLOCK_K": BLOCK_K}  # the launcher's CUDA configuration
        sig.update({k: "constexpr" for k in meta})
        out[f"{name}-{target}"] = resource_usage(compile_kernel(moe_grouped_kernel, sig, meta, cap)).__dict__
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def usage():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CONFIGS)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", [t[0] for t in TARGETS])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiles_without_spills(usage, config, target):
    u = usage[f"{config}-{target}"]
    assert u["local_bytes"] == 0 and u["stack_bytes"] == 0, f"{config} spills on {target}: {u}"
    assert u["registers"] <= 255
