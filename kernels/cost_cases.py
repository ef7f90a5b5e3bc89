"""The kernel cost report's cases: a kernel + launch config + shape → compile → counts → prediction.

A ``Case`` is everything needed to compile one launch exactly as a launcher would make it and to
put its hot loop's counts into the model (``llmq.kernels.cost_model``): the ``@triton.jit`` kernel,
every argument by name (tensors as ``sass.MockPointer``), warps / stages, the grid, the hot loop's
trip count per CTA, the work one iteration does (weight codes, for per-code figures), the bytes the
call must move and its FLOPs. ``evaluate(case, device)`` compiles it and returns a ``Record`` (one
JSON row of ``scripts/kernel_cost.py``).

Adding a kernel (the KV decode kernel, an MoE grouped GEMM, ...): write a builder
``def my_cases(workload: Workload) -> Iterable[Case]`` that calls your launcher's pure ``plan``
function (the one the launcher itself calls, so the constexprs cannot drift) for each autotune
config, decorate it with ``@register("my-family")``, and import its module in
``scripts/kernel_cost.py``. A builder may ignore ``workload`` fields that do not apply to it
(``Workload.m`` is the batch for a KV kernel, say) and must yield nothing for workloads it cannot run.
``tests/kernels/test_cost_report.py`` shows a case built by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from llmq.kernels import sass
from llmq.kernels.cost_model import Device, Launch, matmul_fp16_us, predict


@dataclass(frozen=True)
class Workload:
    """One weight-matmul problem: ``x [m, k] @ W[k, n]`` with ``bits``-bit group-``group_size`` codes."""

    k: int
    n: int
    m: int
    bits: int = 4
    group_size: int = 128
    zeros: str = "none"  # "none" (symmetric), "int" (uint8 zero points) or "float" (fp16 zero points)
    act: str = "fp16"  # activation dtype: fp16 | bf16 | fp32
    bias: bool = False

    @property
    def act_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.act]

    @property
    def label(self) -> str:
        z = {"none": "sym", "int": "int-zeros", "float": "float-zeros"}[self.zeros]
        return f"int{self.bits} g{self.group_size} {z} {self.act}"

    def weight_bytes(self) -> int:
        """Packed codes + fp16 scales (+ zero points) the call reads."""
        groups = -(-self.k // self.group_size)
        zero_bytes = {"none": 0, "int": 1, "float": 2}[self.zeros]
        return self.k * self.n * self.bits // 8 + groups * self.n * (2 + zero_bytes)

    def io_bytes(self) -> int:
        size = {"fp16": 2, "bf16": 2, "fp32": 4}[self.act]
        return self.m * self.k * size + self.m * self.n * size


@dataclass
class Case:
    """One launch to compile and model (see the module docstring)."""

    family: str  # registered builder name
    kernel_name: str  # "gemv", "gemm", "dequant", ...
    config: str  # autotune candidate, e.g. "w4s3" or "128x128 w8s3"
    workload: Workload
    kernel: object  # the @triton.jit function (autotuner wrappers are unwrapped)
    args: dict  # every kernel parameter by name; tensors as sass.MockPointer
    warps: int
    stages: int
    grid: int  # CTAs
    trips: int  # hot-loop iterations per CTA
    codes_per_iter: int  # weight codes one iteration of one CTA dequantizes
    dram_bytes: int
    flops: int
    launches: int = 1  # kernels per call (memset, final cast, ...)
    extra_us: Callable[[Device], float] | None = None  # work outside Triton per call (a cuBLAS matmul)
    extra_note: str = ""


@dataclass
class Record:
    """One row of the report: a (kernel, config, shape, M) with its counts and the model's parts."""

    family: str
    kernel: str
    config: str
    workload: str
    shape: str  # "KxN"
    M: int
    device: str
    registers: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    instr_per_iter: int = 0
    instr_per_code: float = 0.0
    instr_per_byte: float = 0.0  # per byte of global loads
    global_load_bytes_per_thread: int = 0
    load_widths: dict = field(default_factory=dict)
    by_class: dict = field(default_factory=dict)
    dram_us: float = 0.0
    issue_us: float = 0.0
    pipe_us: float = 0.0
    tensor_us: float = 0.0
    shared_us: float = 0.0
    latency_us: float = 0.0
    extra_us: float = 0.0
    predicted_us: float = 0.0
    bound: str = ""
    bytes_in_flight_per_sm: int = 0
    cublas_fp16_us: float = 0.0
    picked: bool = False  # the model's fastest candidate of its (kernel, workload)
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(case: Case, device: Device, capability: int = 90) -> Record:
    """Compile ``case`` as launched, count its hot loop and predict its time on ``device``."""
    w = case.workload
    rec = Record(case.family, case.kernel_name, case.config, w.label, f"{w.k}x{w.n}", w.m, device.name,
                 cublas_fp16_us=matmul_fp16_us(w.m, w.n, w.k, device))
    use, counts, outside = compile_and_count(case, capability)
    threads = 32 * case.warps
    pred = predict(counts, outside, Launch(case.grid, case.warps, case.stages, case.trips, use["registers"],
                                           use["shared_bytes"], case.dram_bytes, case.flops, case.launches), device)
    extra = case.extra_us(device) if case.extra_us else 0.0
    rec.registers, rec.stack_bytes, rec.shared_bytes = use["registers"], use["stack_bytes"], use["shared_bytes"]
    rec.instr_per_iter = counts.total
    rec.instr_per_code = counts.total / (case.codes_per_iter / threads)
    rec.instr_per_byte = counts.total / max(1, counts.global_load_bytes)
    rec.global_load_bytes_per_thread = counts.global_load_bytes
    rec.load_widths = {str(k): v for k, v in sorted(counts.load_widths.items())}
    rec.by_class = {c: counts.by_class[c] for c in sass.CLASSES if counts.by_class.get(c)}
    for part in ("dram_us", "issue_us", "pipe_us", "tensor_us", "shared_us", "latency_us", "bound",
                 "bytes_in_flight_per_sm"):
        setattr(rec, part, getattr(pred, part))
    rec.extra_us = extra
    rec.predicted_us = pred.predicted_us + extra
    return rec


_COMPILED: dict[tuple, tuple] = {}


def compile_and_count(case: Case, capability: int = 90) -> tuple[dict, sass.LoopCounts, int]:
    """``(resource usage, hot-loop counts, instructions outside the loop)``, memoised on the launch's
    specialization: shapes whose ints specialize alike (all multiples of 16, say) compile once."""
    sig, constexprs, attrs, _ = sass.specialize(case.kernel, case.args, capability, case.warps, case.stages)
    key = (id(sass._jit_function(case.kernel)), str(sig), str(constexprs), str(attrs), case.warps, case.stages,
           capability)
    if key not in _COMPILED:
        compiled = sass.compile_as_launched(case.kernel, case.args, capability, case.warps, case.stages)
        counts, outside, _ = sass.loop_counts(sass.parse_sass(sass.cuobjdump(compiled, "-sass")))
        _COMPILED[key] = (sass.resource_usage(compiled), counts, outside)
    return _COMPILED[key]


BUILDERS: dict[str, Callable[[Workload], Iterable[Case]]] = {}


def register(family: str):
    """Decorator: ``builder(workload) -> Iterable[Case]`` under ``family`` (see the module docstring)."""
    def deco(fn):
        if family in BUILDERS:
            raise ValueError(f"cost-report family {family!r} is registered twice")
        BUILDERS[family] = fn
        return fn
    return deco


def cases(workload: Workload, families: Iterable[str] | None = None) -> list[Case]:
    """Every case the named (default: all) builders make for ``workload``."""
    names = list(BUILDERS) if families is None else list(families)
    unknown = [f for f in names if f not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown cost-report families {unknown}: registered {sorted(BUILDERS)}")
    return [c for f in names for c in BUILDERS[f](workload)]


def mark_picks(records: list[Record]) -> None:
    """``picked`` = the fastest predicted candidate per (family, kernel, workload, shape, M, device): what
    an autotuner timing the candidates would choose if the model were right."""
    best: dict[tuple, Record] = {}
    for r in records:
        if r.error:
            continue
        key = (r.family, r.kernel, r.workload, r.shape, r.M, r.device)
        if key not in best or r.predicted_us < best[key].predicted_us:
            best[key] = r
    for r in best.values():
        r.picked = True
