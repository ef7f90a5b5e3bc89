"""A throughput model that turns a kernel's hot-loop SASS counts into a predicted GPU time.

    predicted = max(dram, issue, pipe, tensor, shared, latency) + launch × launches

with, for the busiest SM (``ctas`` = CTAs it runs, ``W`` warps each, ``T`` loop iterations each):

* ``dram    = bytes / dram_bytes_per_s`` — every byte the call must move (packed weight, scales, x, out);
* ``issue   = ctas·W·(T·instr_per_iter + instr_outside) / (min(4, resident warps) · clock)`` — one
  instruction per scheduler per clock, 4 schedulers per SM;
* ``pipe``  — the same for the busiest pipe: the integer/logic pipe (integer, PRMT, compares, fp32 ↔ fp16
  ``F2FP`` / ``HADD2.F32``) runs at half the issue rate on sm_90, conversions and MUFU at 1/8, shuffles at 1/4,
  fp32 and fp16x2 arithmetic share the FMA pipe at full rate;
* ``tensor  = flops / tensor_flops_per_s`` (wgmma rate; mma.sync at half of it);
* ``shared  = ctas·W·T·max(shared instr, shared bytes per warp / 128 B) / clock``;
* ``latency = bytes / (bytes in flight / dram_latency)``: the bytes a resident CTA has in flight per
  iteration (its global loads; ×(stages − 1) when the loop copies asynchronously) times the CTAs an
  SM holds; below ``dram_bytes_per_s × dram_latency`` per GPU the loop waits on memory.

Fit (``scripts/kernel_cost.py --fit``, docs/kernels.md): the H200 run 1 measurements of
BENCHMARKS.md. It ranks versions of one kernel well; it is not a measurement. The device constants
below are what was measured (H200 copy bandwidth, cuBLAS fp16 rate) or the data sheet (H100), and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmq.kernels.sass import LoopCounts


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_hz: float  # issue clock under load
    dram_bytes_per_s: float  # achievable streaming bandwidth (not the data-sheet peak)
    dram_latency_s: float  # loaded DRAM round trip
    tensor_flops_per_s: float  # dense fp16 wgmma, achievable
    launch_s: float  # one launch's fixed GPU-side cost (ramp-up, tail)
    schedulers: int = 4
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    shared_per_sm: int = 233472
    shared_bytes_per_clk: int = 128


DEVICES = {
    # H200: copy bandwidth measured 4.23-4.25 TB/s (BENCHMARKS.md), cuBLAS fp16 measured 733-771 TFLOP/s
    # at M = 4096 (run 1); 5 µs per launch and 0.8 µs loaded latency are fitted to run 1's M = 1 GEMV
    "h200": Device("h200", sms=132, clock_hz=1.90e9, dram_bytes_per_s=4.2e12, dram_latency_s=0.8e-6,
                   tensor_flops_per_s=760e12, launch_s=5e-6),
    # H100 SXM: same SM as the H200; 3.35 TB/s data sheet × the H200's measured 88% copy efficiency
    # (unmeasured here)
    "h100": Device("h100", sms=132, clock_hz=1.90e9, dram_bytes_per_s=2.95e12, dram_latency_s=0.8e-6,
                   tensor_flops_per_s=760e12, launch_s=5e-6),
}

# cycles one warp instruction holds its pipe on one scheduler (sm_90 results per clock per SM: fp32 and
# fp16x2 128, integer/logic/shift/compare 64, conversions and MUFU 16, shuffles 32); classes not named
# here take one issue slot and no other pipe
ALU_CYCLES, XU_CYCLES, SHUFFLE_CYCLES = 2, 8, 4


def pipe_cycles(counts: LoopCounts) -> dict[str, int]:
    """Cycles per iteration one scheduler's pipes are busy for one warp: ``issue`` (1 per instruction),
    ``alu`` (integer / logic / compare / F2FP pack), ``xu`` (conversions, MUFU), ``fma`` (fp32, fp16x2),
    ``shuffle``."""
    c = counts.by_class
    # fp32 <-> fp16 conversions (F2FP pack, HADD2.F32) are half-rate ALU work, not the 1/8-rate XU's
    f2fp = sum(v for k, v in counts.by_opcode.items() if k.startswith(("F2FP", "HADD2.F32")))
    return {"issue": counts.total,
            "alu": ALU_CYCLES * (c.get("int", 0) + c.get("predicate", 0) + f2fp),
            "xu": XU_CYCLES * (c.get("convert", 0) - f2fp + c.get("mufu", 0)),
            "fma": c.get("fp32", 0) + c.get("fp16x2", 0),
            "shuffle": SHUFFLE_CYCLES * c.get("shuffle", 0)}


def occupancy(registers: int, shared_bytes: int, warps: int, device: Device) -> int:
    """CTAs one SM holds, limited by registers (allocated per warp in 256-register units), warps,
    shared memory (1 KB reserved per CTA) and the CTA limit."""
    per_warp = -(-max(8, -(-registers // 8) * 8) * 32 // 256) * 256
    by_regs = (device.regs_per_sm // per_warp) // warps
    by_warps = device.max_warps_per_sm // warps
    by_shared = device.shared_per_sm // (shared_bytes + 1024)
    return max(0, min(by_regs, by_warps, by_shared, device.max_ctas_per_sm))


@dataclass(frozen=True)
class Launch:
    """What the model needs to know about one launch besides the loop's counts."""

    grid: int  # CTAs
    warps: int
    stages: int
    trips: int  # hot-loop iterations per CTA
    registers: int
    shared_bytes: int
    dram_bytes: int  # bytes the call must move through DRAM
    flops: int  # 2·M·N·K
    launches: int = 1  # kernels per call (memset, final cast, ...)


@dataclass(frozen=True)
class Prediction:
    dram_us: float
    issue_us: float
    pipe_us: float
    tensor_us: float
    shared_us: float
    latency_us: float
    predicted_us: float
    bound: str
    ctas_per_sm: int  # on the busiest SM
    resident_ctas: int
    bytes_in_flight_per_sm: int


def predict(counts: LoopCounts, outside: int, launch: Launch, device: Device) -> Prediction:
    """The model above for one launch (times in µs)."""
    occ = max(1, occupancy(launch.registers, launch.shared_bytes, launch.warps, device))
    ctas = -(-launch.grid // device.sms)
    resident = min(occ, ctas)
    sched = min(device.schedulers, resident * launch.warps)
    warp_instr = ctas * launch.warps * (launch.trips * counts.total + outside)
    issue = warp_instr / (sched * device.clock_hz)
    pipe_per_iter = max(pipe_cycles(counts).values())
    pipe = ctas * launch.warps * (launch.trips * pipe_per_iter + outside) / (sched * device.clock_hz)
    mma = counts.by_opcode
    wgmma = sum(v for k, v in mma.items() if k.startswith(("HGMMA", "WGMMA")))
    mma_sync = sum(v for k, v in mma.items() if k.startswith("HMMA"))
    tensor = 0.0
    if wgmma or mma_sync:
        tensor = launch.flops / (device.tensor_flops_per_s * (1.0 if wgmma >= mma_sync else 0.5))
    shared_instr = counts.by_class.get("shared_load", 0) + counts.by_class.get("shared_store", 0)
    shared_cycles = max(shared_instr, counts.shared_bytes * 32 / device.shared_bytes_per_clk)
    shared = ctas * launch.warps * launch.trips * shared_cycles / device.clock_hz
    dram = launch.dram_bytes / device.dram_bytes_per_s
    asynchronous = counts.by_class.get("async_copy", 0) > 0
    depth = max(1, launch.stages - 1) if asynchronous else 1
    in_flight = resident * launch.warps * 32 * counts.global_load_bytes * depth
    latency = launch.dram_bytes / (in_flight * device.sms / device.dram_latency_s) if in_flight else 0.0
    parts = {"dram": dram, "issue": issue, "pipe": pipe, "tensor": tensor, "shared": shared, "latency": latency}
    bound = max(parts, key=parts.get)
    total = parts[bound] + device.launch_s * launch.launches
    us = {k: v * 1e6 for k, v in parts.items()}
    return Prediction(dram_us=us["dram"], issue_us=us["issue"], pipe_us=us["pipe"], tensor_us=us["tensor"],
                      shared_us=us["shared"], latency_us=us["latency"], predicted_us=total * 1e6, bound=bound,
                      ctas_per_sm=ctas, resident_ctas=resident, bytes_in_flight_per_sm=in_flight)


def matmul_fp16_us(m: int, n: int, k: int, device: Device) -> float:
    """cuBLAS fp16 as the same model sees it: max(fp16 weight + x + out bytes / bandwidth, flops / tensor
    rate) + one launch (µs). What 'within 1.3x of cuBLAS' is measured against on the CPU."""
    dram = (2 * n * k + 2 * m * k + 2 * m * n) / device.dram_bytes_per_s
    return (max(dram, 2 * m * n * k / device.tensor_flops_per_s) + device.launch_s) * 1e6
