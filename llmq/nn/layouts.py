"""The layouts a ``QuantLinear``'s ``qweight`` can be held in, and the conversions between them.

* ``"canonical"`` — ``llmq.quant.packing``: codes packed along K, ``[ceil(K / P), N]`` int32. What
  checkpoints store and what the torch backend reads.
* ``"tiled"`` — ``llmq.kernels.dequant_tile``: K permuted inside tiles so that one field of one tile
  is a contiguous run of input features, ``[tiled_rows(K, bits), N]`` int32. What the Triton kernels
  read.
* ``"cpu"`` — ``llmq.nn.cpu_layout``: what torch's int4 / int8 CPU kernels read (torch's own int4
  pack of ``[N, K]`` codes, or ``[N, K]`` signed int8). What the cpu backend reads.
* ``"cpu-split"`` — ``llmq.nn.cpu_layout``: 8-bit codes with groups as two int4 packs (high and low
  nibbles). What the cpu backend reads for grouped 8-bit weights.

A layer holds its packed weight in exactly one layout at a time (never both: a second copy would cost
the packed size again, +3.4 GB for a 4-bit 7B model). Each backend names the layout it reads; the
layer converts when a backend that reads another one first runs (``QuantLinear.use_qweight_layout``),
and converts back to canonical for ``state_dict`` and before ``load_state_dict``.
"""

from __future__ import annotations

from typing import Callable

import torch

CANONICAL = "canonical"
TILED = "tiled"
CPU = "cpu"
CPU_SPLIT = "cpu-split"
LAYOUTS = (CANONICAL, TILED, CPU, CPU_SPLIT)

Convert = Callable[[torch.Tensor, int, int], torch.Tensor]  # (qweight, bits, K) -> qweight


def _converters(layout: str) -> tuple[Convert, Convert]:
    """``(from_canonical, to_canonical)`` for ``layout``; imported lazily (the tiled one needs triton)."""
    if layout == CANONICAL:
        return (lambda q, bits, k: q), (lambda q, bits, k: q)
    if layout == TILED:
        from llmq.kernels.dequant_tile import repack_tiled, unrepack_tiled
        return repack_tiled, unrepack_tiled
    if layout == CPU:
        from llmq.nn.cpu_layout import from_cpu, to_cpu
        return to_cpu, from_cpu
    if layout == CPU_SPLIT:
        from llmq.nn.cpu_layout import from_cpu_split, to_cpu_split
        return to_cpu_split, from_cpu_split
    raise ValueError(f"unknown qweight layout {layout!r}: choose one of {LAYOUTS}")


def to_canonical(qweight: torch.Tensor, layout: str, bits: int, k: int) -> torch.Tensor:
    """``qweight`` held in ``layout`` → canonical words (the same tensor when already canonical)."""
    return _converters(layout)[1](qweight, bits, k)


def from_canonical(canonical: torch.Tensor, layout: str, bits: int, k: int) -> torch.Tensor:
    """Canonical words → ``layout`` (the same tensor for ``"canonical"``)."""
    return _converters(layout)[0](canonical, bits, k)
