"""Activation recipe (W8A8): how the inputs of Linear layers are quantized and calibrated."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from llmq.recipes.schema import _enum, _from_dict

SUPPORTED_ACT_BITS = (8,)


class ActScheme(str, Enum):
    """When activation scales are computed."""

    DYNAMIC = "dynamic"  # online: a scale per token row, computed at every forward
    STATIC = "static"  # offline: one scale per tensor, fixed by calibration


class ActGranularity(str, Enum):
    PER_TOKEN = "per-token"
    PER_TENSOR = "per-tensor"


class ObserverKind(str, Enum):
    """Calibration method choosing a static scale (``llmq.observers``)."""

    MINMAX = "minmax"
    EMA = "ema"
    PERCENTILE = "percentile"
    MSE = "mse"
    KL = "kl"


# The one valid granularity per scheme: dynamic scales are per token row (a scale
# per whole tensor computed online would make every token pay for the worst one);
# static scales are per tensor (a per-token scale cannot be known offline).
_SCHEME_GRANULARITY = {ActScheme.DYNAMIC: ActGranularity.PER_TOKEN, ActScheme.STATIC: ActGranularity.PER_TENSOR}

# SmoothQuant strength when none is given, per scheme. One static scale per tensor must cover the
# outlier channels that per-token scales absorb row by row, so static needs more migration into the
# weights. Chosen on held-out text (first 8,192 tokens of the BBC calibration split, SmolLM2-135M,
# 32 x 512 calibration; docs/w8a8.md): dynamic is flat over 0.5-0.9 (+1.1-1.6 %), static min-max /
# percentile go from +35 % / +25 % at 0.5 to +2.9 % / +2.1 % at 0.9.
DEFAULT_SMOOTHQUANT_ALPHA = {ActScheme.DYNAMIC: 0.5, ActScheme.STATIC: 0.9}
SCHEME_DEFAULT = "scheme-default"  # ActivationRecipe.smoothquant_alpha: use DEFAULT_SMOOTHQUANT_ALPHA[scheme]


@dataclass(frozen=True)
class ActivationRecipe:
    """How to quantize the *inputs* of Linear layers (W8A8; weights int8 per output channel).

    Attributes:
        bits: activation code width; only 8 (signed int8 feeding an int8 GEMM).
        scheme: ``dynamic`` (per-token scales at run time) or ``static``
            (per-tensor scale from calibration).
        granularity: ``per-token`` for dynamic, ``per-tensor`` for static (the
            only combinations implemented; ``None`` picks the scheme's one).
        observer: calibration method for static scales. Dynamic scales are always
            the row's absolute max, so only ``minmax`` is accepted with ``dynamic``.
        momentum: EMA observer's weight of the running value (``0 < m < 1``):
            ``range = m * range + (1 - m) * batch_range``.
        percentile: percentile observer's kept fraction of ``|x|`` in percent,
            ``50 < p <= 100``.
        smoothquant_alpha: SmoothQuant migration strength in ``[0, 1]``, ``None``
            for no smoothing, or ``SCHEME_DEFAULT`` (the default): 0.5 for dynamic,
            0.9 for static (``DEFAULT_SMOOTHQUANT_ALPHA``).
    """

    bits: int = 8
    scheme: ActScheme = ActScheme.DYNAMIC
    granularity: ActGranularity | None = None
    observer: ObserverKind = ObserverKind.MINMAX
    momentum: float = 0.9
    percentile: float = 99.9999  # chosen on held-out calibration text (docs/w8a8.md)
    smoothquant_alpha: float | str | None = SCHEME_DEFAULT

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_ACT_BITS:
            raise ValueError(f"unsupported activation bits {self.bits!r}: choose one of {SUPPORTED_ACT_BITS}")
        scheme = _enum(ActScheme, self.scheme, "activation scheme")
        object.__setattr__(self, "scheme", scheme)
        gran = _SCHEME_GRANULARITY[scheme] if self.granularity is None else _enum(
            ActGranularity, self.granularity, "activation granularity")
        if gran is not _SCHEME_GRANULARITY[scheme]:
            raise ValueError(f"{scheme.value} activation scales are {_SCHEME_GRANULARITY[scheme].value}, "
                             f"not {gran.value}: drop the granularity or pick the other scheme")
        object.__setattr__(self, "granularity", gran)
        obs = _enum(ObserverKind, self.observer, "observer")
        object.__setattr__(self, "observer", obs)
        if scheme is ActScheme.DYNAMIC and obs is not ObserverKind.MINMAX:
            raise ValueError(f"observer {obs.value!r} calibrates static scales; dynamic per-token scales are the "
                             f"row's absmax (observer 'minmax'): use --act-scheme static with --observer {obs.value}")
        if not (isinstance(self.momentum, (int, float)) and 0.0 < self.momentum < 1.0):
            raise ValueError(f"EMA momentum must be a number in (0, 1), got {self.momentum!r}")
        if not (isinstance(self.percentile, (int, float)) and 50.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile must be in (50, 100] (percent of |x| kept), got {self.percentile!r}")
        a = self.smoothquant_alpha
        if a == SCHEME_DEFAULT:
            a = DEFAULT_SMOOTHQUANT_ALPHA[scheme]
            object.__setattr__(self, "smoothquant_alpha", a)
        if a is not None and not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
            raise ValueError(f"SmoothQuant alpha must be in [0, 1] or None (no smoothing), got {a!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "scheme": self.scheme.value,
            "granularity": self.granularity.value,
            "observer": self.observer.value,
            "momentum": self.momentum,
            "percentile": self.percentile,
            "smoothquant_alpha": self.smoothquant_alpha,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActivationRecipe":
        return _from_dict(cls, d, "activation")

