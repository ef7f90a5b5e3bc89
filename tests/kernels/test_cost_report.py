"""The kernel cost report (``llmq.kernels.sass``, ``cost_model``, ``cost_cases``; ``scripts/kernel_cost.py``).

CPU only: SASS parsing, classification and loop finding on a hand-written listing, the model's
arithmetic on hand-made counts, the launch specialization against triton's own binder, and one real
case compiled end to end in a subprocess (compiling needs ``TRITON_INTERPRET`` unset).
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from llmq.kernels import sass
from llmq.kernels.cost_model import DEVICES, Launch, matmul_fp16_us, occupancy, pipe_cycles, predict

ROOT = Path(__file__).resolve().parents[2]

LISTING = """
        Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   PRMT R6, R4, 0x400, R5 ;
        /*0040*/                   LOP3.LUT R6, R6, 0xf000f, R7, 0xea, !PT ;
        /*0050*/                   HFMA2 R8, R6, R9, -1032, -1032 ;
        /*0060*/                   HADD2.F32 R10, -RZ, R8.H0_H0 ;
        /*0070*/                   FADD R11, R11, R10 ;
        /*0080*/                   LDG.E.U16 R12, desc[UR4][R2.64+0x10] ;
        /*0090*/                   IMAD.MOV.U32 R13, RZ, RZ, R12 ;
        /*00a0*/               @P0 BRA 0x50 ;
        /*00b0*/                   ISETP.GE.AND P1, PT, R0, 0x10, PT ;
        /*00c0*/              @!P1 BRA 0x20 ;
        /*00d0*/                   STG.E desc[UR4][R2.64], R11 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0;
        /*0100*/                   NOP;
"""


def test_parse_and_classify():
    ins = sass.parse_sass(LISTING)
    assert [i.opcode for i in ins[:3]] == ["LDC", "S2R", "LDG.E.128"]
    assert ins[10].pred == "@P0" and ins[10].operands == "0x50"
    assert ins[12].pred == "@!P1"
    cls = {op: sass.classify(op) for op in ("LDG.E.128", "LDGSTS.E.BYPASS.128", "LDSM.16.M88.4", "STS.U16", "HGMMA.64x64x16.F32",
                                            "PRMT", "LOP3.LUT", "HFMA2.MMA", "HADD2.F32", "F2FP.F16.F32.PACK_AB", "I2F.RP",
                                            "FFMA", "MUFU.RCP", "SHFL.BFLY", "BAR.SYNC", "IMAD.MOV.U32", "IMAD.WIDE",
                                            "ISETP.GE.AND", "UIADD3", "BRA", "RED.E.ADD.F32", "STL", "XYZ")}
    assert cls == {"LDG.E.128": "global_load", "LDGSTS.E.BYPASS.128": "async_copy", "LDSM.16.M88.4": "shared_load",
                   "STS.U16": "shared_store", "HGMMA.64x64x16.F32": "mma", "PRMT": "int", "LOP3.LUT": "int",
                   "HFMA2.MMA": "fp16x2", "HADD2.F32": "convert", "F2FP.F16.F32.PACK_AB": "convert", "I2F.RP": "convert",
                   "FFMA": "fp32", "MUFU.RCP": "mufu", "SHFL.BFLY": "shuffle", "BAR.SYNC": "barrier",
                   "IMAD.MOV.U32": "move", "IMAD.WIDE": "int", "ISETP.GE.AND": "predicate", "UIADD3": "uniform",
                   "BRA": "control", "RED.E.ADD.F32": "global_store", "STL": "local", "XYZ": "other"}
    assert [sass.access_bytes(o) for o in ("LDG.E.128", "LDG.E.64", "LDG.E.U16", "LDG.E", "LDGSTS.E.BYPASS.128",
                                           "STS.U8", "LDSM.16.M88.4", "LDSM.16.MT88.2")] == [16, 8, 2, 4, 16, 1, 16, 8]


def test_loops_and_counts():
    ins = sass.parse_sass(LISTING)
    loops = sass.find_loops(ins)
    # back edges: 0xa0 -> 0x50 (inner), 0xc0 -> 0x20 (outer); "BRA 0xf0" to itself is the end-of-kernel trap
    assert sass.Loop(2, 12) in loops and sass.Loop(5, 10) in loops
    assert sass.hot_loop(ins) == sass.Loop(2, 12)
    counts, outside, loop = sass.loop_counts(ins, inner_trips=3)
    # 0x20..0xc0 = 11 instructions, of which 0x50..0xa0 (6) run 3 times: 5 + 18
    assert counts.total == 23 and outside == 5  # LDC, S2R, STG, EXIT, BRA (NOP excluded)
    assert counts.by_class["global_load"] == 1 + 3 and counts.global_load_bytes == 16 + 3 * 2
    assert counts.load_widths == Counter({16: 1, 2: 3})
    assert counts.by_class["fp16x2"] == 3 and counts.by_class["convert"] == 3
    no_loop = sass.parse_sass(LISTING.replace("@P0 BRA 0x50", "NOP").replace("@!P1 BRA 0x20", "NOP"))
    c, out, lp = sass.loop_counts(no_loop)
    assert lp is None and out == 0 and c.total == 14  # 17 lines, 3 NOPs


def test_model_arithmetic():
    h200 = DEVICES["h200"]
    c = sass.LoopCounts(total=100, by_class=Counter({"int": 40, "fp16x2": 40, "global_load": 4, "convert": 2}),
                        by_opcode=Counter({"HADD2.F32": 2}), global_load_bytes=64)
    assert pipe_cycles(c) == {"issue": 100, "alu": 84, "xu": 0, "fma": 40, "shuffle": 0}
    assert occupancy(64, 1024, 4, h200) == 8  # 65536 / (64·128) registers
    assert occupancy(128, 200_000, 4, h200) == 1  # shared memory
    launch = Launch(grid=132 * 2, warps=4, stages=3, trips=10, registers=64, shared_bytes=0,
                    dram_bytes=4_200_000, flops=0, launches=2)
    p = predict(c, outside=50, launch=launch, device=h200)
    # busiest SM: 2 CTAs × 4 warps × (10·100 + 50) warp-instructions over 4 schedulers at 1.9 GHz
    assert p.issue_us == pytest.approx(2 * 4 * 1050 / 4 / 1.9e9 * 1e6)
    assert p.dram_us == pytest.approx(1.0)
    # in flight: 2 CTAs × 128 threads × 64 B; latency bound = bytes / (in flight · SMs / latency)
    assert p.bytes_in_flight_per_sm == 2 * 128 * 64
    assert p.latency_us == pytest.approx(4.2e6 / (2 * 128 * 64 * 132 / 0.8e-6) * 1e6)
    assert p.bound == "latency" and p.predicted_us == pytest.approx(p.latency_us + 2 * 5.0)
    assert matmul_fp16_us(4096, 8192, 8192, h200) == pytest.approx(2 * 4096 * 8192 * 8192 / 760e12 * 1e6 + 5)


@pytest.fixture
def compile_env(monkeypatch):
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}


def test_specialization_is_the_runtimes(compile_env):
    """Ints equal to 1 become constants; pointers and ints divisible by 16 carry tt.divisibility; others not."""
    code = """
import json, torch
from llmq.kernels import dequant_gemv
from llmq.kernels.sass import MockPointer, specialize
pl = dequant_gemv.plan(1, 4096, 4096, 4, 128, 32, torch.float16, False, False, 132)
args = dict(x_ptr=MockPointer(torch.float16), qw_ptr=MockPointer(torch.int32), s_ptr=MockPointer(torch.float16),
            z_ptr=MockPointer(torch.float16, aligned=False), b_ptr=MockPointer(torch.float16),
            out_ptr=MockPointer(torch.float32), **pl.ints, **pl.constexprs)
args["stride_xm"] = 4100  # not a multiple of 16
sig, const, attrs, _ = specialize(dequant_gemv.dequant_gemv_kernel, args)
names = list(sig)
print(json.dumps({"M": sig["M"], "N": sig["N"], "div": sorted(names[k[0]] for k, v in attrs.items() if v)}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=compile_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["M"] == "constexpr" and r["N"] == "i32"
    assert {"x_ptr", "qw_ptr", "s_ptr", "b_ptr", "out_ptr", "N", "K", "group_size", "num_groups", "stride_om"} <= set(r["div"])
    assert "z_ptr" not in r["div"] and "stride_xm" not in r["div"]


def test_script_end_to_end(compile_env, tmp_path):
    """One real case: compiled, counted, predicted, written as JSON with the documented fields."""
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, "scripts/kernel_cost.py", "--ms", "1", "--shapes", "4096x4096",
                           "--families", "dequant-gemv", "--out", str(out)], cwd=ROOT, env=compile_env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(not r["error"] for r in rows)
    for key in ("kernel", "config", "shape", "M", "instr_per_code", "dram_us", "issue_us", "predicted_us", "bound"):
        assert key in rows[0]
    picked = [r for r in rows if r["picked"]]
    assert len(picked) == 1 and picked[0]["shape"] == "4096x4096" and picked[0]["M"] == 1
    r = picked[0]
    assert r["instr_per_code"] > 0 and r["by_class"]["global_load"] > 0 and r["stack_bytes"] == 0
    assert r["predicted_us"] >= max(r["dram_us"], r["issue_us"])
    assert "| gemv |" in proc.stdout


def test_unknown_family_is_an_error():
    from llmq.kernels import cost_cases
    with pytest.raises(ValueError, match="unknown cost-report families"):
        cost_cases.cases(cost_cases.Workload(64, 64, 1), ["no-such-kernel"])


def test_workload_bytes():
    from llmq.kernels.cost_cases import Workload
    w = Workload(8192, 8192, 1, 4, 128, "int")
    assert w.weight_bytes() == 8192 * 8192 // 2 + 64 * 8192 * 3
    assert w.io_bytes() == 8192 * 2 + 8192 * 2
    assert Workload(64, 64, 1, act="bf16").act_dtype == torch.bfloat16


def test_crossover_compares_the_fused_gemm_at_its_fitted_time():
    """The crossover table picks dequantize+cuBLAS from the smallest M where it beats the fused GEMM's
    *fitted* time (predicted / FUSED_GEMM_FIT) at that and every larger M: a GEMM the model calls equal
    to cuBLAS still loses to dequantize+cuBLAS at 1.06x cuBLAS. In a subprocess: importing
    scripts/kernel_cost.py unsets TRITON_INTERPRET (it compiles), which must not leak into this worker."""
    code = """
import json, sys
from types import SimpleNamespace
sys.path.insert(0, "scripts")
import kernel_cost

def fake_run(workloads, device, families, capability, log=None):
    m = workloads[0].m
    gemm = 100.0 * m / 256 if m >= 256 else 80.0  # tensor-bound from M = 256 (= "cuBLAS")
    scratch = gemm * 1.06 + (90.0 if m < 512 else 0.0)  # a dequantize cost that only pays from 512
    return [SimpleNamespace(kernel="gemm", predicted_us=gemm, picked=True),
            SimpleNamespace(kernel="scratch+cublas", predicted_us=scratch, picked=True)]

kernel_cost.run = fake_run
device = kernel_cost.DEVICES["h200"]
table, rows = kernel_cost.crossover_table([device], [4], log=None)
fit = kernel_cost.FUSED_GEMM_FIT
kernel_cost.FUSED_GEMM_FIT = 1.0  # the raw model
raw, _ = kernel_cost.crossover_table([device], [4], log=None)
print(json.dumps({"table": table, "rows": rows, "fit": fit, "raw": raw}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    table = out["table"]
    assert table["devices"]["h200"]["4"]["large"] == {"gemv_max_m": 16, "scratch_min_m": 512, "source": "predicted"}
    assert table["devices"]["default"] == table["devices"]["h200"]
    assert all(r["gemm_fitted"] == pytest.approx(r["gemm"] / out["fit"]) for r in out["rows"])
    assert out["raw"]["devices"]["h200"]["4"]["large"]["scratch_min_m"] == 1 << 62  # the GEMM never loses
