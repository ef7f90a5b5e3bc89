"""Compile every shipped configuration of the dequantize-matmul kernels for sm_80 and sm_90a (no GPU
needed), as the launchers launch them (the runtime's divisibility-16 / ==1 specialization, the launchers'
own ``plan``), symmetric and with integer and float zero points, and fail on a compile error, a
register spill (local/stack memory) or shared memory over the target's limit. Prints registers /
shared memory per configuration (``pytest -s`` to see them).

The compiles run in a subprocess with ``TRITON_INTERPRET`` unset (``llmq.kernels.dequant_aot``
explains why); conftest sets it for this process.
"""

import json
import os
import subprocess
import sys

import pytest

from llmq.kernels.aot import TARGETS

# max dynamic shared memory per block (bytes): A100 (sm_80) / H100 (sm_90a)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}


@pytest.fixture(scope="module")
def compiled_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "llmq.kernels.dequant_aot"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("target", [t for t, _ in TARGETS])
def test_every_config_compiles_without_spills(compiled_rows, target):
    rows = [r for r in compiled_rows if r["target"] == target]
    assert len(rows) >= 60, f"expected every config of both kernels, got {len(rows)}"
    for zeros in ("zeros=none", "zeros=int", "zeros=float"):  # each dequantization sequence is compiled
        for kernel in ("gemv", "gemm"):
            assert any(r["config"].startswith(kernel) and zeros in r["config"] for r in rows), (kernel, zeros)
    assert any("M=1 " in r["config"] for r in rows) and any("M=16 " in r["config"] for r in rows)
    bad = []
    print(f"\n{target}: {len(rows)} configs")
    for r in rows:
        if "error" in r:
            bad.append(f"{r['config']}: compile error {r['error'][:500]}")
            continue
        print(f"  {r['config']:<64} regs={r['registers']:<4} shared={r['shared_bytes']:<7} "
              f"local={r['local_bytes']} stack={r['stack_bytes']}")
        if r["local_bytes"] or r["stack_bytes"]:
            bad.append(f"{r['config']}: spills (local={r['local_bytes']} stack={r['stack_bytes']})")
        if r["shared_bytes"] > SHARED_LIMIT[target]:
            bad.append(f"{r['config']}: shared memory {r['shared_bytes']} > {SHARED_LIMIT[target]}")
    assert not bad, "\n".join(bad)
