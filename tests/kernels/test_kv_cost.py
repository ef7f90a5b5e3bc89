"""The KV decode kernel in the cost report (``kernels/kv_cost.py``): compiled as launched, counted, modelled.

Compiling needs ``TRITON_INTERPRET`` unset, so the report runs in a subprocess (as in test_cost_report.py).
The SASS assertions are the structure the rebuild is for (one online-softmax step per block of fields
rather than per field; no spills; a quantized-loop-free fp16 specialization), with bounds that the kernels
before it (per field; 8 warps) fail with triton 3.9 and 3.6 (docs/benchmarks/kv_cost_h200_before*.json,
docs/kv_cache.md). They are not timings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmq.kernels import kv_attention
from llmq.kernels.kv_cost import KVWorkload

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r'''
import json, sys
from llmq.kernels import kv_cost
from llmq.kernels.cost_model import DEVICES
recs = kv_cost.report(DEVICES["h200"], bits_list=(16, 4), batch=8, context=32768)
print(json.dumps([r.to_dict() for r in recs]))
'''


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["format"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


def test_int4_one_softmax_step_per_block_of_fields(records):
    r = records["int4"]
    assert not r["error"], r["error"]
    assert r["tokens_per_iter"] == kv_attention.BLOCK_W[4] // kv_attention.ROW_FIELDS[4] * 8
    assert r["stack_bytes"] == 0
    # per 128 tokens: the per-field kernel had 200 shuffles (triton 3.9; 168 with 3.6) and was predicted 7.09x
    # (7.56x) its DRAM floor; one softmax step per block of fields at 8 warps 4.47x (4.63x); at 4 warps (the
    # 8-warp program computed each 16x16 score tile 4 times) 3.06x (3.21x). Barriers per iteration are per warp,
    # so they are not compared across warp counts.
    per128 = 128 / r["tokens_per_iter"]
    assert r["shuffles_per_iter"] * per128 <= 150, r["by_class"]
    assert r["vs_floor"] <= 3.5, (r["vs_floor"], r["by_class"])
    assert r["mma_per_iter"] > 0 and r["dram_us"] > 0 and r["predicted_us"] >= r["dram_us"]


def test_fp16_cache_compiles_without_the_quantized_loop(records):
    r = records["fp16"]
    assert not r["error"], r["error"]
    assert r["registers"] <= 96 and r["stack_bytes"] == 0  # with the quantized loop: 126-128 before, ~250 now
    assert r["bound"] == "dram"


def test_floor_bytes():
    """The DRAM floor counts codes, scales + zeros and the fp16 residual exactly (7B shape, 32k, B = 8)."""
    w = KVWorkload(4)
    nq, bh = 32768 - 128, 8 * 32
    assert w.cache_bytes() == {"codes": 2 * bh * nq * 128 // 2,
                               "scales_zeros": bh * (nq // 64 * 128 * 3 + nq * 2 * 3),
                               "residual": 2 * bh * 128 * 128 * 2}
    assert KVWorkload(16).cache_bytes()["residual"] == 2 * bh * 32768 * 128 * 2


def test_plan_is_what_the_launcher_launches():
    """The launcher's splits come from plan (the report compiles plan's constexprs)."""
    pl = kv_attention.plan(2, 8, 2, 64, 160, 7, 4, 32, True, False, True, torch.float16, None, interpret=True,
                           num_splits=2, block_n=16)
    assert pl.grid == (4, 2) and pl.ints["tokens_per_split"] == 128 and pl.ints["n_rep"] == 4
    assert pl.constexprs["HAS_QUANT"] and pl.constexprs["HAS_MASK"] and pl.constexprs["BLOCK_H"] == 16
    assert not kv_attention.plan(1, 4, 4, 64, 0, 37, 4, 32, True, False, False, torch.float16, 132).constexprs[
        "HAS_QUANT"]
