"""Ahead-of-time compile of the quantized-KV decode kernels for sm_80 / sm_90a: no errors, no spills.

The compile runs in a subprocess with ``TRITON_INTERPRET=0``: under the interpreter the
``@triton.jit`` helpers the split kernel calls are ``InterpretedFunction`` objects, and
running any interpreted kernel that calls a helper leaves ``triton.language`` patched
(triton 3.9 restores the patch scope only for top-level kernels), which breaks code
generation later in the same process.
"""

import json
import os
import subprocess
import sys

import pytest

from llmq.kernels.aot import TARGETS

CONFIGS = {
    "int4-channel-asym-fp16": ("fp16", dict(BITS=4, GROUP=64, KEY_PER_CHANNEL=True, SYMMETRIC=False,
                                            HAS_MASK=False)),
    "int2-token-sym-bf16-mask": ("bf16", dict(BITS=2, GROUP=32, KEY_PER_CHANNEL=False, SYMMETRIC=True,
                                              HAS_MASK=True)),
    "int8-channel-asym-fp16-mask": ("fp16", dict(BITS=8, GROUP=64, KEY_PER_CHANNEL=True, SYMMETRIC=False,
                                                 HAS_MASK=True)),
}

_SCRIPT = r'''
import inspect, json, sys
import triton.language as tl
from llmq.kernels.aot import TARGETS, compile_kernel, resource_usage
from llmq.kernels.kv_attention import (BLOCK_W, FIELDS_PER_STEP, QUANT_WARPS, ROW_FIELDS, _kv_decode_reduce_kernel,
                                       _kv_decode_split_kernel, kv_decode_attention)

DEFAULTS = {k: v.default for k, v in inspect.signature(kv_decode_attention).parameters.items()}

def split_signature(act):
    sig = {"Q": f"*{act}", "KC": "*i32", "KS": "*fp16", "KZ": "*u8", "VC": "*i32", "VS": "*fp16", "VZ": "*u8",
           "KR": f"*{act}", "VR": f"*{act}", "MASK": "*i8", "O_PART": "*fp32", "M_PART": "*fp32",
           "L_PART": "*fp32"}
    for name in ("n_quant", "n_res", "n_kv_heads", "n_rep", "tokens_per_split", "n_splits"):
        sig[name] = "i32"
    sig["sm_scale"] = "fp32"
    for name in ("stride_qb", "stride_qh", "stride_cb", "stride_ch", "stride_ct", "stride_ksb", "stride_ksh",
                 "stride_kst", "stride_vsb", "stride_vsh", "stride_vst", "stride_rb", "stride_rh", "stride_rt",
                 "stride_mb"):
        sig[name] = "i32"
    for name in ("BITS", "GROUP", "KEY_PER_CHANNEL", "SYMMETRIC", "HAS_MASK", "HEAD_DIM", "BLOCK_N", "BLOCK_W",
                 "BLOCK_H", "DOT_DTYPE", "FIELDS_PER_STEP", "HAS_QUANT", "ROW_FIELDS"):
        sig[name] = "constexpr"
    return sig

configs = json.loads(sys.argv[1])
out = {}
for target, cap in TARGETS:
    for name, (act, meta) in configs.items():
        dot = {"fp16": tl.float16, "bf16": tl.bfloat16}[act]
        # the launcher's default launch options (its warps with quantized tokens); Llama-7B head_dim 128, up to 16 q heads per kv head
        c = compile_kernel(_kv_decode_split_kernel, split_signature(act),
                           dict(meta, HEAD_DIM=128, BLOCK_N=DEFAULTS["block_n"], BLOCK_W=BLOCK_W[meta["BITS"]],
                                BLOCK_H=16, DOT_DTYPE=dot, FIELDS_PER_STEP=FIELDS_PER_STEP[meta["BITS"]],
                                HAS_QUANT=True, ROW_FIELDS=ROW_FIELDS[meta["BITS"]]), cap,
                           num_warps=QUANT_WARPS[meta["BITS"]], num_stages=DEFAULTS["num_stages"])
        out[f"{name}-{target}"] = resource_usage(c).__dict__
    sig = {"O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", "OUT": "*fp16", "n_splits": "i32",
           "n_q_heads": "i32", "stride_ob": "i32", "stride_oh": "i32", "HEAD_DIM": "constexpr",
           "BLOCK_S": "constexpr"}
    c = compile_kernel(_kv_decode_reduce_kernel, sig, dict(HEAD_DIM=128, BLOCK_S=64), cap, num_warps=4)
    out[f"reduce-{target}"] = resource_usage(c).__dict__
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
@pytest.mark.parametrize("config", list(CONFIGS) + ["reduce"])
def test_compiles_without_spills(usage, config, target):
    u = usage[f"{config}-{target}"]
    assert u["local_bytes"] == 0 and u["stack_bytes"] == 0, f"{config} spills on {target}: {u}"
    assert u["registers"] <= 255
