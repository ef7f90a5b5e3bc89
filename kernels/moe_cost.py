"""Cost-report cases of the grouped MoE kernel (``moe_grouped``): decode and small batches of real MoE shapes.

A decode step of an MoE layer runs two grouped launches (``llmq.nn.triton_experts``): gate_up
(``K = hidden``, ``N = 2·intermediate``; pair ``p`` reads token ``p // top_k``) and down (``K =
intermediate``, ``N = hidden``). Each is compiled here from the launcher's own ``moe_grouped.plan``
and put through the cost model like the weight kernels (``cost_cases.evaluate``).

What the model is told, per launch (``T`` tokens, ``E`` experts, top-``k`` routing):

* **experts read** — routing is taken as uniform and independent per token, so the expected number
  of distinct experts a batch touches is ``E·(1 − (1 − k/E)^T)``; only their packed codes, scales
  (and zeros) move through DRAM, plus the activations in and out;
* **CTAs that run a K loop** — every touched expert has at least one ``BLOCK_M`` block, and the
  ``T·k`` pairs fill at least ``⌈T·k / BLOCK_M⌉`` blocks: the larger of the two (a lower bound; a
  skewed routing adds partly filled blocks). Blocks of no expert (``expert_ids = −1``) launch but
  run no loop, and are left out;
* **the floor to compare with** — the same touched experts' weights in fp16 read once at the
  device's bandwidth (``fp16_floor_us``): what an ideal fp16 grouped GEMM would need. The record's
  ``cublas_fp16_us`` holds it (a dense cuBLAS call over one matrix would be the wrong baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.kernels import moe_grouped
from llmq.kernels.cost_cases import Case, Record, Workload, evaluate
from llmq.kernels.cost_model import Device
from llmq.kernels.sass import MockPointer

BLOCK_M = 16  # llmq.nn.triton_experts.BLOCK_M (a test keeps them equal; importing llmq.nn here would load torch's nn stack)
NUM_WARPS, NUM_STAGES = 4, 3  # the launcher passes neither: triton's defaults


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer: ``experts`` of ``hidden → intermediate → hidden`` SwiGLU MLPs, ``top_k`` per token."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int


SHAPES = {
    "mixtral-8x7b": MoEShape("mixtral-8x7b", 4096, 14336, 8, 2),
    "qwen3-30b-a3b": MoEShape("qwen3-30b-a3b", 2048, 768, 128, 8),
}


def experts_touched(shape: MoEShape, tokens: int) -> float:
    """Expected distinct experts a batch of ``tokens`` routes to (uniform, independent routing)."""
    return shape.experts * (1.0 - (1.0 - shape.top_k / shape.experts) ** tokens)


def _pointers(act: torch.dtype, zeros: str) -> dict:
    z = {"none": torch.float16, "int": torch.uint8, "float": torch.float16}[zeros]
    return dict(a_ptr=MockPointer(act), sorted_ptr=MockPointer(torch.int32), expert_ptr=MockPointer(torch.int32),
                qw_ptr=MockPointer(torch.int32), s_ptr=MockPointer(torch.float16), z_ptr=MockPointer(z),
                out_ptr=MockPointer(act))


def launch_cases(shape: MoEShape, tokens: int, bits: int = 4, group_size: int = 128, zeros: str = "none",
                 act: str = "fp16") -> list[tuple[Case, float]]:
    """``[(case, fp16_floor_us_bytes)]`` for the two launches of one MoE layer's decode step; the second
    item is the fp16 bytes of the touched experts' weight (the floor's numerator)."""
    out = []
    pairs = tokens * shape.top_k
    touched = experts_touched(shape, tokens)
    used_blocks = max(round(touched), -(-pairs // BLOCK_M))
    for part, k, n, a_div in (("gate_up", shape.hidden, 2 * shape.intermediate, shape.top_k),
                              ("down", shape.intermediate, shape.hidden, 1)):
        w = Workload(k, n, pairs, bits, group_size, zeros, act)
        per_expert = w.weight_bytes()
        rows_in = tokens if part == "gate_up" else pairs
        size = {"fp16": 2, "bf16": 2, "fp32": 4}[act]
        dram = round(touched * per_expert) + rows_in * k * size + pairs * n * size
        all_blocks = -(-pairs // BLOCK_M) + shape.experts
        pl = moe_grouped.plan(all_blocks, n, k, bits, group_size, w.act_dtype, zeros, BLOCK_M)
        groups = -(-k // group_size)
        args = {**_pointers(w.act_dtype, zeros), "num_pairs": pairs, "N": n, "K": k, "group_size": group_size,
                "num_groups": groups, "packed_rows": -(-k // pl.constexprs["P"]), "a_div": a_div,
                "stride_am": k, "stride_om": n, **pl.constexprs}
        rows = -(-k // pl.constexprs["P"])
        trips = -(-rows // moe_grouped.BLOCK_W)
        case = Case("moe-grouped", f"moe-{part}", f"{shape.name} T={tokens} w{NUM_WARPS}s{NUM_STAGES}", w,
                    moe_grouped.moe_grouped_kernel, args, NUM_WARPS, NUM_STAGES, used_blocks * pl.grid[1], trips,
                    moe_grouped.BLOCK_W * pl.constexprs["P"] * pl.constexprs["BLOCK_N"], dram, 2 * pairs * n * k)
        out.append((case, touched * k * n * 2))
    return out


def moe_records(device: Device, shapes=None, tokens=(1, 16, 64), bits=(4,), capability: int = 90,
                log=print) -> list[Record]:
    """Compile, count and predict every (shape, tokens, bits) launch; ``record.cublas_fp16_us`` = the fp16 floor."""
    records = []
    for shape in shapes or SHAPES.values():
        for t in tokens:
            for b in bits:
                for case, fp16_bytes in launch_cases(shape, t, b):
                    try:
                        rec = evaluate(case, device, capability)
                    except Exception as e:  # noqa: BLE001 — a failed compile is a reported row, not a crash
                        w = case.workload
                        rec = Record(case.family, case.kernel_name, case.config, w.label, f"{w.k}x{w.n}", w.m,
                                     device.name, error=f"{type(e).__name__}: {str(e)[:300]}")
                    else:
                        rec.cublas_fp16_us = fp16_bytes / device.dram_bytes_per_s * 1e6 + device.launch_s * 1e6
                    rec.picked = True  # one config per launch: the launcher has no autotuning here
                    records.append(rec)
                    if log:
                        log(f"  compiled {rec.kernel} {rec.config} int{b}"
                            + (f" ERROR {rec.error}" if rec.error else f": {rec.instr_per_code:.2f} instr/code, "
                               f"{rec.predicted_us:.1f} µs vs fp16 floor {rec.cublas_fp16_us:.1f} µs ({rec.bound})"))
    return records
