"""Cost-report cases of the quantized-KV decode kernel (``kv_attention``), built from the launcher's own ``plan``.

One case per (KV format, batch, context): the split kernel compiled exactly as ``kv_decode_attention_launch``
launches it (``kv_attention.plan`` gives every size and constexpr, ``sass.compile_as_launched`` the
runtime's specialization), its hot loop counted, and ``cost_model.predict`` against the DRAM floor: the
bytes the step must read (packed codes, scales, zeros, the fp16 residual window, q) and write (the fp32
split partials, read back by the reduce kernel, and the output).

The quantized formats count the quantized loop (the kernel's largest); ``fp16`` (every token in the
residual window, how ``scripts/bench_kv_attention.py`` times the kernel's fp16 path) counts the residual
loop instead (the only loop of the ``HAS_QUANT = False`` specialization; in a kernel without that
constexpr, the other outer loop with tensor-core instructions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from llmq.kernels import kv_attention, sass
from llmq.kernels.cost_model import Device, Launch, predict
from llmq.kernels.sass import MockPointer

SMS = 132  # H100 / H200: the split count depends on it


@dataclass(frozen=True)
class KVWorkload:
    """One decode step of one layer: ``batch`` sequences of ``context`` tokens, the last ``residual`` in fp16.

    The default is the shape of BENCHMARKS.md §2 (Llama-2-7B: 32 query and 32 KV heads, head_dim 128; keys
    per channel, values per token, asymmetric, group 64, 128-token fp16 residual window).
    ``bits = 16``: no quantized tokens (the fp16 cache through the same kernel).
    """

    bits: int
    batch: int = 8
    context: int = 32768
    q_heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    group_size: int = 64
    key_per_channel: bool = True
    symmetric: bool = False
    residual: int = 128

    @property
    def n_quant(self) -> int:
        return 0 if self.bits == 16 else self.context - self.residual

    @property
    def n_res(self) -> int:
        return self.context - self.n_quant

    @property
    def label(self) -> str:
        return "fp16" if self.bits == 16 else f"int{self.bits}"

    def cache_bytes(self) -> dict[str, int]:
        """Bytes of one layer's cache the step reads, by part."""
        bh, d, g, nq = self.batch * self.kv_heads, self.head_dim, self.group_size, self.n_quant
        zero = 0 if self.symmetric else 1
        key_meta = (nq // g * d if self.key_per_channel else nq * (d // g)) * (2 + zero)
        if self.bits == 16:
            return {"codes": 0, "scales_zeros": 0, "residual": 2 * bh * self.n_res * d * 2}
        return {"codes": 2 * bh * nq * d * self.bits // 8, "scales_zeros": bh * (key_meta + nq * (d // g) * (2 + zero)),
                "residual": 2 * bh * self.n_res * d * 2}


def mock_args(w: KVWorkload, pl: kv_attention.KVPlan) -> dict:
    """Every split-kernel argument: tensors as ``MockPointer``, strides of a contiguous cache of ``context``
    tokens' capacity in the ``llmq.quant.kv`` layout, the sizes and constexprs of ``pl``."""
    bits = 4 if w.bits == 16 else w.bits  # fp16: no codes are read; any valid code layout compiles the same
    p, d, g, t, hkv = 32 // bits, w.head_dim, w.group_size, w.context, w.kv_heads
    ks_rows, ks_cols = (t // g, d) if w.key_per_channel else (t, d // g)
    return dict(
        Q=MockPointer(torch.float16), KC=MockPointer(torch.int32), KS=MockPointer(torch.float16),
        KZ=MockPointer(torch.uint8), VC=MockPointer(torch.int32), VS=MockPointer(torch.float16),
        VZ=MockPointer(torch.uint8), KR=MockPointer(torch.float16), VR=MockPointer(torch.float16),
        MASK=MockPointer(torch.float32), O_PART=MockPointer(torch.float32), M_PART=MockPointer(torch.float32),
        L_PART=MockPointer(torch.float32), **pl.ints, sm_scale=1.0 / math.sqrt(d),
        stride_qb=w.q_heads * d, stride_qh=d,
        stride_cb=hkv * (t // p) * d, stride_ch=(t // p) * d, stride_ct=d,
        stride_ksb=hkv * ks_rows * ks_cols, stride_ksh=ks_rows * ks_cols, stride_kst=ks_cols,
        stride_vsb=hkv * t * (d // g), stride_vsh=t * (d // g), stride_vst=d // g,
        stride_rb=hkv * w.n_res * d, stride_rh=w.n_res * d, stride_rt=d, stride_mb=0, **pl.constexprs)


@dataclass
class KVRecord:
    """One row of the KV cost report."""

    format: str
    batch: int
    context: int
    heads: str  # "32/32" (query / KV)
    device: str
    config: str = ""
    registers: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    tokens_per_iter: int = 0
    instr_per_iter: int = 0
    instr_per_element: float = 0.0  # per KV element (token × channel, K and V) per thread
    barriers_per_iter: int = 0
    shuffles_per_iter: int = 0
    mma_per_iter: int = 0
    conversions_per_iter: int = 0
    global_loads_per_iter: int = 0
    load_widths: dict = field(default_factory=dict)  # bytes per thread per load → count per iteration
    by_class: dict = field(default_factory=dict)
    cache_bytes: dict = field(default_factory=dict)
    dram_bytes: int = 0
    dram_us: float = 0.0  # the floor: dram_bytes at the device's streaming bandwidth
    issue_us: float = 0.0
    pipe_us: float = 0.0
    shared_us: float = 0.0
    latency_us: float = 0.0
    predicted_us: float = 0.0
    vs_floor: float = 0.0  # predicted / (dram_us + launches)
    bound: str = ""
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _residual_loop(instrs: list[sass.Instr]) -> sass.Loop:
    loops = sass.find_loops(instrs)
    outer = [lp for lp in loops if not any(o != lp and o.start <= lp.start and lp.end <= o.end for o in loops)]
    hot = sass.hot_loop(instrs)
    with_mma = [lp for lp in outer if lp != hot and any(sass.classify(instrs[i].opcode) == "mma"
                                                       for i in range(lp.start, lp.end + 1))]
    if not with_mma:
        raise RuntimeError("no residual loop (an outer loop with MMA besides the quantized loop) in the SASS")
    return max(with_mma, key=lambda lp: lp.end - lp.start)


_COMPILED: dict = {}


def _compile(pl: kv_attention.KVPlan, args: dict, capability: int):
    key = (repr(sorted((k, str(v)) for k, v in args.items())), pl.num_warps, pl.num_stages, capability)
    if key not in _COMPILED:
        c = sass.compile_as_launched(kv_attention._kv_decode_split_kernel, args, capability, pl.num_warps,
                                     pl.num_stages)
        _COMPILED[key] = (sass.parse_sass(sass.cuobjdump(c, "-sass")), sass.resource_usage(c))
    return _COMPILED[key]


def evaluate(w: KVWorkload, device: Device, capability: int = 90) -> KVRecord:
    """Compile the split kernel as launched for ``w``, count its loop and predict its time on ``device``."""
    pl = kv_attention.plan(w.batch, w.q_heads, w.kv_heads, w.head_dim, w.n_quant, w.n_res,
                           4 if w.bits == 16 else w.bits, w.group_size, w.key_per_channel, w.symmetric, False,
                           torch.float16, SMS)
    rec = KVRecord(w.label, w.batch, w.context, f"{w.q_heads}/{w.kv_heads}", device.name,
                   f"w{pl.num_warps}s{pl.num_stages} splits={pl.grid[1]}")
    instrs, use = _compile(pl, mock_args(w, pl), capability)
    tps = pl.ints["tokens_per_split"]
    if w.bits == 16:
        # without quantized tokens the launcher compiles no quantized loop (HAS_QUANT): the residual loop is hot
        loop = _residual_loop(instrs) if pl.constexprs.get("HAS_QUANT", True) else sass.hot_loop(instrs)
        tokens = pl.constexprs["BLOCK_N"]
        trips = -(-min(tps, w.n_res) // tokens)
        counts = sass.count_range(instrs, loop.start, loop.end)
    else:
        tokens = pl.quant_tokens_per_iter
        trips = -(-min(tps, w.n_quant) // tokens)
        loop = sass.hot_loop(instrs)
        nested = [lp for lp in sass.find_loops(instrs) if lp != loop and loop.start <= lp.start and lp.end <= loop.end]
        # a runtime loop over the softmax steps of a word's fields, nested in the quantized loop, runs
        # P / (ROW_FIELDS * FIELDS_PER_STEP) times per iteration (a tile row holds every ROW_FIELDS-th field)
        steps = (32 // w.bits) // (pl.constexprs["FIELDS_PER_STEP"] * pl.constexprs["ROW_FIELDS"])
        counts = sass.count_range(instrs, loop.start, loop.end, steps, nested)
    outside = sum(1 for i, ins in enumerate(instrs) if not (loop.start <= i <= loop.end) and ins.opcode != "NOP")
    cache = w.cache_bytes()
    splits = pl.grid[1]
    io = w.batch * w.q_heads * (2 * w.head_dim * 2 + 2 * splits * (w.head_dim + 2) * 4)  # q, out; partials
    dram = sum(cache.values()) + io
    flops = 4 * w.batch * w.q_heads * w.context * w.head_dim
    grid = pl.grid[0] * pl.grid[1]
    pred = predict(counts, outside, Launch(grid, pl.num_warps, pl.num_stages, trips, use["registers"],
                                           use["shared_bytes"], dram, flops, launches=2), device)
    threads = 32 * pl.num_warps
    c = counts.by_class
    rec.registers, rec.stack_bytes, rec.shared_bytes = use["registers"], use["stack_bytes"], use["shared_bytes"]
    rec.tokens_per_iter, rec.instr_per_iter = tokens, counts.total
    rec.instr_per_element = counts.total / (2 * tokens * w.head_dim / threads)
    rec.barriers_per_iter, rec.shuffles_per_iter = c.get("barrier", 0), c.get("shuffle", 0)
    rec.mma_per_iter, rec.conversions_per_iter = c.get("mma", 0), c.get("convert", 0)
    rec.global_loads_per_iter = c.get("global_load", 0) + c.get("async_copy", 0)
    rec.load_widths = {str(k): v for k, v in sorted(counts.load_widths.items())}
    rec.by_class = {k: c[k] for k in sass.CLASSES if c.get(k)}
    rec.cache_bytes, rec.dram_bytes = cache, dram
    rec.dram_us, rec.issue_us, rec.pipe_us = pred.dram_us, pred.issue_us, pred.pipe_us
    rec.shared_us, rec.latency_us, rec.bound = pred.shared_us, pred.latency_us, pred.bound
    rec.predicted_us = pred.predicted_us
    rec.vs_floor = pred.predicted_us / (pred.dram_us + 2 * device.launch_s * 1e6)
    return rec


def report(device: Device, bits_list=(16, 8, 4, 2), batch: int = 8, context: int = 32768,
           capability: int = 90) -> list[KVRecord]:
    """One record per KV format for the 7B shape (``KVWorkload`` defaults)."""
    out = []
    for bits in bits_list:
        w = KVWorkload(bits, batch, context)
        try:
            out.append(evaluate(w, device, capability))
        except Exception as e:  # noqa: BLE001 — a format that fails to compile is reported, not fatal
            out.append(KVRecord(w.label, batch, context, f"{w.q_heads}/{w.kv_heads}", device.name,
                                error=f"{type(e).__name__}: {str(e)[:300]}"))
    return out


COLUMNS = ("format", "config", "registers", "tokens_per_iter", "instr_per_iter", "instr_per_element",
           "barriers_per_iter", "shuffles_per_iter", "mma_per_iter", "conversions_per_iter", "global_loads_per_iter",
           "dram_us", "issue_us", "pipe_us", "shared_us", "latency_us", "predicted_us", "vs_floor", "bound")


def table(records: list[KVRecord]) -> str:
    """Markdown table of ``records``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        if r.error:
            lines.append(f"| {r.format} | ERROR {r.error[:120]} |")
            continue
        d = r.to_dict()
        lines.append("| " + " | ".join(f"{d[k]:.2f}" if isinstance(d[k], float) else str(d[k]) for k in COLUMNS) + " |")
    return "\n".join(lines)
