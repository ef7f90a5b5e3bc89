"""Unsaturated observers: absolute max (``MinMaxObserver``) and its running average (``EMAObserver``)."""

from __future__ import annotations

import torch

from llmq.observers.base import Observer


class MinMaxObserver(Observer):
    """Smallest and largest value ever seen; ``T = max(|min|, |max|)`` (unsaturated)."""

    def __init__(self, bits: int = 8, per_channel: bool = False, axis: int = -1) -> None:
        super().__init__(bits, per_channel, axis)
        self.min_val: torch.Tensor | None = None  # [C]
        self.max_val: torch.Tensor | None = None  # [C]

    def _observe(self, x2d: torch.Tensor) -> None:
        lo, hi = x2d.amin(dim=0), x2d.amax(dim=0)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def _threshold(self) -> torch.Tensor:
        return torch.maximum(self.min_val.abs(), self.max_val.abs())


class EMAObserver(Observer):
    """Exponential moving average of each batch's min and max (seed: 指数平滑法).

    ``range = momentum * range + (1 - momentum) * batch_range``, initialised by
    the first batch; ``T = max(|min_ema|, |max_ema|)``. Unsaturated per batch, but
    a rare outlier batch is averaged away instead of fixing the range forever.
    """

    def __init__(self, momentum: float = 0.9, bits: int = 8, per_channel: bool = False, axis: int = -1) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1), got {momentum}")
        super().__init__(bits, per_channel, axis)
        self.momentum = momentum
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, x2d: torch.Tensor) -> None:
        lo, hi = x2d.amin(dim=0), x2d.amax(dim=0)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            m = self.momentum
            self.min_val = m * self.min_val + (1 - m) * lo
            self.max_val = m * self.max_val + (1 - m) * hi

    def _threshold(self) -> torch.Tensor:
        return torch.maximum(self.min_val.abs(), self.max_val.abs())
