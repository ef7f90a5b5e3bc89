"""Cost report of the lookup-table kernels (``scripts/kernel_cost.py --lut``): each LUT kernel config
compiled for sm_90a exactly as its launcher launches it (the launchers' own ``plan``, the runtime's
divisibility specialization via ``sass.compile_as_launched``), its hot loop counted, and its instructions
per code compared with the uniform decode kernel (``dequant_gemv``, symmetric) at the same bits.

1-bit has no uniform kernel: it is compared with uniform 2-bit (the cheapest uniform width per code).
Target (issue 19): the decode hot loop (M = 1, fp16) within ``TARGET_RATIO`` = 1.5x of the uniform
kernel's instructions per code, for every bits x table kind. Predictions are a model, not measurements.
"""

from __future__ import annotations

import torch

from llmq.kernels import cost_cases, lut_gemv, lut_scratch
from llmq.kernels.cost_cases import Case, Workload
from llmq.kernels.cost_model import Device, matmul_fp16_us
from llmq.kernels.dequant_cost import SMS, gemv_cases
from llmq.kernels.dequant_tile import TILE_WORDS
from llmq.kernels.sass import MockPointer
from llmq.quant.packing import codes_per_word

TARGET_RATIO = 1.5
KINDS = ("shared", "column")  # codebook [1, 2**bits] (nf, log2, binary) / [N, 2**bits] (kmeans)


def lut_weight_bytes(w: Workload, kind: str) -> int:
    """Packed codes + fp16 scales + the fp16 codebook the call reads."""
    tables = (1 if kind == "shared" else w.n) * (2 << w.bits)
    return w.k * w.n * w.bits // 8 + -(-w.k // w.group_size) * w.n * 2 + tables


def gemv_case(w: Workload, kind: str) -> tuple[Case, lut_gemv.LutGemvPlan]:
    """The decode launch (the first autotune candidate of its path) for ``w`` with a ``kind`` table."""
    pl = lut_gemv.plan(w.m, w.n, w.k, w.bits, w.group_size, -(-w.k // w.group_size), kind == "column", w.act_dtype,
                       w.bias, SMS)
    out = w.act_dtype if pl.mode == lut_gemv.OUT_STORE else torch.float32
    args = dict(x_ptr=MockPointer(w.act_dtype), qw_ptr=MockPointer(torch.int32), cb_ptr=MockPointer(torch.float16),
                s_ptr=MockPointer(torch.float16), b_ptr=MockPointer(torch.float16), out_ptr=MockPointer(out),
                **pl.ints, **pl.constexprs)
    step = pl.constexprs["TILES_PER_STEP"]
    warps, stages = lut_gemv.GPU_CONFIGS[pl.path][0]
    dram = lut_weight_bytes(w, kind) + w.io_bytes() + (w.m * w.n * 12 if pl.mode == lut_gemv.OUT_ATOMIC_ADD else 0)
    case = Case("lut-gemv", "lut-gemv", f"{pl.path} {kind} split={pl.split} w{warps}s{stages}", w,
                lut_gemv.lut_gemv_kernel, args, warps, stages, pl.grid[0] * pl.grid[1] * pl.grid[2],
                pl.tiles_per_split // step, step * TILE_WORDS * codes_per_word(w.bits) * pl.constexprs["BLOCK_N"],
                dram, 2 * w.m * w.n * w.k, 3 if pl.mode == lut_gemv.OUT_ATOMIC_ADD else 1)
    return case, pl


def scratch_case(w: Workload, kind: str) -> Case:
    grid, ints, constexprs = lut_scratch.plan(w.n, w.k, w.bits, w.group_size, -(-w.k // w.group_size), kind == "column")
    args = dict(qw_ptr=MockPointer(torch.int32), cb_ptr=MockPointer(torch.float16), s_ptr=MockPointer(torch.float16),
                w_ptr=MockPointer(w.act_dtype), **ints, **constexprs)
    return Case("lut-scratch", "lut-scratch+cublas", f"{kind} w{lut_scratch.NUM_WARPS}", w,
                lut_scratch.lut_scratch_kernel, args, lut_scratch.NUM_WARPS, 1, grid[0] * grid[1], 1,
                TILE_WORDS * constexprs["P"] * constexprs["BLOCK_N"], lut_weight_bytes(w, kind) + w.k * w.n * 2,
                2 * w.m * w.n * w.k, 1, extra_us=lambda device: matmul_fp16_us(w.m, w.n, w.k, device))


def uniform_per_code(w: Workload, device: Device, capability: int) -> tuple[float, str]:
    """The model's pick of the uniform symmetric decode kernel at ``w.bits`` (2 for 1-bit): instr/code."""
    u = Workload(w.k, w.n, w.m, max(2, w.bits), w.group_size, "none", w.act)
    recs = [cost_cases.evaluate(c, device, capability) for c in gemv_cases(u)]
    best = min(recs, key=lambda r: r.predicted_us)
    return best.instr_per_code, f"int{u.bits} {best.config}"


def report(device: Device, bits=(1, 2, 3, 4), shapes=((8192, 8192), (8192, 28672)), ms=(1, 16, 4096),
           group_size: int = 128, act: str = "fp16", capability: int = 90, log=print) -> list[dict]:
    """One record per (bits, table kind, shape, M): the LUT kernel's counts and prediction and, for the
    decode kernel, the uniform kernel's instr/code and the ratio."""
    rows = []
    for b in bits:
        for k, n in shapes:
            for m in ms:
                w = Workload(k, n, m, b, group_size, "none", act)
                uni = uniform_per_code(w, device, capability) if m <= 16 else None
                for kind in KINDS:
                    case = gemv_case(w, kind)[0] if m <= 16 else scratch_case(w, kind)
                    rec = cost_cases.evaluate(case, device, capability).to_dict()
                    use = cost_cases.compile_and_count(case, capability)[0]  # memoised: the same compile
                    rec.update(bits=b, table=kind, local_bytes=use["local_bytes"])
                    if uni:
                        rec.update(uniform_instr_per_code=uni[0], uniform_config=uni[1],
                                   ratio=rec["instr_per_code"] / uni[0])
                    rows.append(rec)
                    if log:
                        tail = f" uniform {uni[0]:.2f} -> {rec['ratio']:.2f}x" if uni else ""
                        log(f"  int{b} {kind} {k}x{n} M={m} {rec['config']}: {rec['instr_per_code']:.2f} instr/code "
                            f"regs={rec['registers']} stack={rec['stack_bytes']}{tail}")
    return rows


def table(rows: list[dict]) -> str:
    out = ["| bits | table | K×N | M | config | regs | stack | instr/code | uniform | ratio | DRAM µs | issue µs | "
           "predicted µs | bound |", "|" + "---|" * 14]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "—"
        uni = f"{r['uniform_instr_per_code']:.2f}" if "ratio" in r else "—"
        out.append(f"| {r['bits']} | {r['table']} | {r['shape']} | {r['M']} | {r['config']} | {r['registers']} | "
                   f"{r['stack_bytes']} | {r['instr_per_code']:.2f} | {uni} | {ratio} | {r['dram_us']:.1f} | "
                   f"{r['issue_us']:.1f} | {r['predicted_us']:.1f} | {r['bound']} |")
    return "\n".join(out)
