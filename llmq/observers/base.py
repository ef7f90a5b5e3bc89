"""Observer protocol shared by every calibration method.

An observer watches activations during calibration and turns what it saw into
a clipping *threshold* ``T`` and a symmetric int8 *scale*::

    obs = KLObserver()                 # or MinMaxObserver(), EMAObserver(0.9), ...
    for x in calibration_batches:      # x: [..., C] float, any leading dims
        obs.observe(x)
    obs.threshold()                    # [] per tensor, [C] per channel (fp32)
    obs.scale()                        # threshold / 127.5, safe for all-zero data

Mapping (seed document, "saturated vs unsaturated"):

* **unsaturated** (``MinMaxObserver``, ``EMAObserver``): ``T`` is the largest
  ``|x|`` seen (or its running average), so ``±T`` maps onto the ends of the int8
  range and nothing is clipped — one outlier stretches the step for everyone.
* **saturated** (``PercentileObserver``, ``MSEObserver``, ``KLObserver``): ``T`` is
  chosen below the absolute max; values beyond ``±T`` saturate at ``-128``/``127``.

Scales follow ``llmq.quant.primitives``' symmetric convention: ``S = T / 127.5``
so ``[-T, T]`` spreads over all 256 levels ``[-128, 127]`` (unsigned code =
signed + 128), and the error inside the range is at most ``S / 2``.

Degenerate input:
* ``threshold()`` / ``scale()`` before any ``observe`` raise ``ValueError`` (no
  silent default scale for a layer calibration never reached).
* all-zero data gives ``T = 0`` and the documented safe scale ``1.0`` (the
  primitives' rule for all-zero groups): zeros quantize to exactly 0 and nothing
  divides by zero. Scales are also floored at fp16's smallest normal number.
* NaN/Inf activations raise ``ValueError``.

Per channel: ``per_channel=True`` keeps one statistic per index of ``axis``
(default ``-1``, the feature dimension of ``[tokens, features]`` activations)
and reduces over every other dimension.
"""

from __future__ import annotations

import torch

from llmq.quant.primitives import qmax

SAFE_SCALE = 1.0  # scale used when every observed value was 0
MIN_SCALE = torch.finfo(torch.float16).tiny


def scale_from_threshold(threshold: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric scale ``T / (Qmax / 2)``; ``T = 0`` gives ``SAFE_SCALE``; floored at ``MIN_SCALE``."""
    s = threshold.float() / (qmax(bits) / 2)
    return torch.where(s > 0, s, torch.full_like(s, SAFE_SCALE)).clamp(min=MIN_SCALE)


class Observer:
    """Base class: input checks, per-tensor / per-channel reshaping, scale from threshold.

    Subclasses implement ``_observe(x2d)`` (``x2d``: ``[rows, C]`` float32, ``C = 1``
    per tensor) and ``_threshold() -> [C]``.
    """

    saturated: bool = False  # whether the threshold may clip observed values

    def __init__(self, bits: int = 8, per_channel: bool = False, axis: int = -1) -> None:
        if bits < 2 or bits > 16:
            raise ValueError(f"observer bits must be in [2, 16], got {bits}")
        self.bits = bits
        self.per_channel = per_channel
        self.axis = axis
        self.num_channels: int | None = None
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate statistics of one batch ``x`` (any shape; float)."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__}.observe expects a float tensor, got {type(x).__name__}"
                             f"{'' if not torch.is_tensor(x) else ' of dtype ' + str(x.dtype)}")
        if x.numel() == 0:
            return
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise ValueError(f"{type(self).__name__}.observe: activations contain NaN/Inf; "
                             f"calibrate on finite data (check the model in fp32)")
        if self.per_channel:
            x = x.movedim(self.axis, -1)
            x2d = x.reshape(-1, x.shape[-1])
        else:
            x2d = x.reshape(-1, 1)
        if self.num_channels is None:
            self.num_channels = x2d.shape[1]
        elif x2d.shape[1] != self.num_channels:
            raise ValueError(f"{type(self).__name__}: batch has {x2d.shape[1]} channels along axis {self.axis}, "
                             f"earlier batches had {self.num_channels}")
        self._observe(x2d)
        self.batches += 1

    def threshold(self) -> torch.Tensor:
        """Clipping threshold ``T >= 0``: shape ``[]`` per tensor or ``[C]`` per channel, float32."""
        if self.batches == 0:
            raise ValueError(f"{type(self).__name__} has observed no data: run calibration batches through "
                             f"observe(x) before asking for a threshold or scale (is the layer ever reached?)")
        t = self._threshold()
        return t if self.per_channel else t.reshape(())

    def scale(self) -> torch.Tensor:
        """Symmetric int8 scale ``T / 127.5`` (see module docstring for the all-zero rule)."""
        return scale_from_threshold(self.threshold(), self.bits)

    # -- subclass hooks --
    def _observe(self, x2d: torch.Tensor) -> None:
        raise NotImplementedError

    def _threshold(self) -> torch.Tensor:
        raise NotImplementedError
