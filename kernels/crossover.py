"""Which weight-matmul regime runs for a given M: the crossover table ``llmq/data/kernel_crossover.json``
(package data of ``llmq.data``: ``llmq.kernels`` ships only kernel modules).

Three regimes, by rows M of the activations:

* ``gemv``    — M <= ``gemv_max_m``: split-K decode kernel (``dequant_gemv``);
* ``gemm``    — fused tensor-core GEMM (``dequant_gemm``) in between;
* ``scratch`` — M >= ``scratch_min_m``: dequantize to a reused fp16 buffer, then cuBLAS
  (``dequant_scratch``), where cuBLAS's tensor-core throughput beats the fused GEMM.

The table holds one entry per (device, bits, shape class); each entry says where its numbers come
from: ``"predicted"`` (the cost report, ``scripts/kernel_cost.py --crossover``, no GPU) or
``"measured"`` (``scripts/bench_kernels.py --crossover`` on that GPU, which overwrites the entry).
A device without an entry uses ``"default"``. The choice and its source are logged once per
(device, bits, shape class) on ``logging.getLogger("llmq")``.

Format (``version`` 1)::

    {"version": 1,
     "devices": {"h200": {"4": {"small": {"gemv_max_m": 16, "scratch_min_m": 512, "source": "predicted"},
                                "large": {...}}, ...}, "default": {...}}}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

# package data of llmq.data (not beside the kernels: llmq.kernels ships only the kernel modules)
TABLE_PATH = Path(__file__).resolve().parents[1] / "llmq" / "data" / "kernel_crossover.json"
if not TABLE_PATH.exists():  # installed wheel: kernels/ is llmq/kernels, the table is llmq/data
    TABLE_PATH = Path(__file__).resolve().parents[1] / "data" / "kernel_crossover.json"
FORMAT_VERSION = 1
SMALL_WEIGHTS = 1 << 25  # K·N up to 32 Mi weights (e.g. 4096 x 8192) is "small"
REGIMES = ("gemv", "gemm", "scratch")
logger = logging.getLogger("llmq")


def shape_class(k: int, n: int) -> str:
    """``"small"`` for K·N <= 32 Mi weights, else ``"large"``."""
    return "small" if k * n <= SMALL_WEIGHTS else "large"


def device_key(device: torch.device) -> str:
    """The table's key for ``device``: ``"h100"`` / ``"h200"`` from the CUDA device name, else ``"default"``."""
    if device.type != "cuda":
        return "default"
    name = torch.cuda.get_device_name(device).lower()
    return next((key for key in ("h200", "h100") if key in name), "default")


@dataclass(frozen=True)
class Crossover:
    gemv_max_m: int
    scratch_min_m: int
    source: str  # "predicted" | "measured" | "built-in"


BUILT_IN = Crossover(16, 1 << 62, "built-in")  # no table entry: the pre-table rule (gemv <= 16 < gemm)


@lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    """The parsed table; ``ValueError`` naming the file if its format version is unknown."""
    with open(path) as f:
        table = json.load(f)
    if table.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: crossover table version {table.get('version')!r}, expected {FORMAT_VERSION}; "
                         "regenerate it with scripts/kernel_cost.py --crossover")
    return table


_logged: set = set()


def crossover(bits: int, k: int, n: int, device: torch.device) -> Crossover:
    """The entry for this layer on ``device`` (``BUILT_IN`` if the table has none)."""
    devices = load_table()["devices"]
    dev = device_key(device)
    entry = devices.get(dev, devices.get("default", {})).get(str(bits), {}).get(shape_class(k, n))
    c = BUILT_IN if entry is None else Crossover(entry["gemv_max_m"], entry["scratch_min_m"], entry["source"])
    key = (dev, bits, shape_class(k, n))
    if key not in _logged:
        _logged.add(key)
        logger.info("llmq weight kernels on %s, int%d %s layers: gemv for M <= %d, dequantize+cuBLAS for M >= %d, "
                    "fused GEMM between (%s)", dev, bits, shape_class(k, n), c.gemv_max_m, c.scratch_min_m, c.source)
    return c


# a constant while torch.compile traces (the table is read from a file and the choice logged: not traceable)
@torch.compiler.assume_constant_result
def regime_for(m: int, bits: int = 4, k: int = 4096, n: int = 4096, device: torch.device | None = None) -> str:
    """``"gemv"``, ``"gemm"`` or ``"scratch"`` for M rows of a ``bits``-bit K x N layer on ``device``."""
    c = crossover(bits, k, n, device or torch.device("cpu"))
    if m <= c.gemv_max_m:
        return "gemv"
    return "scratch" if m >= c.scratch_min_m else "gemm"
