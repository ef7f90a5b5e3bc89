"""Weight recipe: which Linears to quantize, to how many bits, in what groups, by which method."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from llmq.recipes.schema import _from_dict

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 8)  # uniform levels; non-uniform kinds: llmq.quant.levels.LEVEL_BITS (binary: 1)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)

# Modules that are never quantized unless a user includes them explicitly:
# the output head and the embeddings are the most sensitive layers of an LLM
# and, when tied, share one tensor.
DEFAULT_EXCLUDE = ("lm_head", "*embed*")


class WeightMethod(str, Enum):
    """Algorithm that turns float weights into integer codes."""

    RTN = "rtn"  # round to nearest, no data
    GPTQ = "gptq"
    AWQ = "awq"
    HQQ = "hqq"
    SMOOTHQUANT = "smoothquant"
    QAT = "qat"  # quantization-aware training (llmq.qat / scripts/qat_finetune.py), not a one-shot quantizer


class Levels(str, Enum):
    """Where the ``2**bits`` values of a code lie (CLI ``--levels``; tables and fitting: ``llmq.quant.levels``)."""

    UNIFORM = "uniform"  # the integer grid (code - zero) * scale
    NF = "nf"  # normal-float quantiles (NF4-style), one shared table
    KMEANS = "kmeans"  # a learned table per output channel (sensitivity-weighted k-means)
    LOG2 = "log2"  # signed powers of two, one shared table
    BINARY = "binary"  # sign x per-group scale


# bit widths each non-uniform kind takes
LEVEL_BITS = {Levels.NF: (2, 3, 4), Levels.KMEANS: (2, 3, 4), Levels.LOG2: (2, 3, 4), Levels.BINARY: (1,)}


class ZeroPoint(str, Enum):
    """How an asymmetric recipe stores its per-group zero points."""

    INT = "int"  # uint8 codes in [0, 2**bits - 1] (GPTQ / AWQ checkpoints): 0.0 is exactly representable
    FLOAT = "float"  # a float per group (HQQ): the zero moves off the integer grid to fit the weights


# Methods that can produce each zero-point kind, and the default per method (asymmetric recipes).
FLOAT_ZERO_METHODS = (WeightMethod.HQQ,)
# Widest code for which those methods default to float zeros. At 8 bits a float zero can only
# move the grid by a fraction of 1/255 of the range, and HQQ's shrinkage is inactive (every
# residual is below its threshold); chosen on held-out text (the first 8,192 tokens of the BBC
# calibration split), SmolLM2-135M int8 per channel: integer zeros 23.535, float zeros 23.546
# (2-4 bits favour float zeros: docs/quality.md, "HQQ zero points").
FLOAT_ZERO_MAX_BITS = 4


# Methods that quantize to non-uniform levels (the others have no notion of a codebook)
LEVEL_METHODS = (WeightMethod.RTN, WeightMethod.GPTQ, WeightMethod.QAT)


def default_zero_point(method: WeightMethod, bits: int) -> ZeroPoint:
    """The zero-point kind an asymmetric recipe gets when none is asked for."""
    if method in FLOAT_ZERO_METHODS and bits <= FLOAT_ZERO_MAX_BITS:
        return ZeroPoint.FLOAT
    return ZeroPoint.INT


def _check_patterns(name: str, patterns: Any) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise ValueError(f"{name} must be a list of fnmatch patterns, not the single string {patterns!r}; "
                         f"write [{patterns!r}]")
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{name} entries must be non-empty strings, got {p!r}")
    return patterns


@dataclass(frozen=True)
class WeightRecipe:
    """How to quantize the weights of ``nn.Linear`` layers.

    Attributes:
        bits: code width, one of ``SUPPORTED_WEIGHT_BITS``.
        group_size: number of consecutive input features (along K) sharing one
            scale/zero, one of ``SUPPORTED_GROUP_SIZES``; ``None`` means one group
            per output channel (per-channel quantization). When K is not a multiple
            of the group size the last group is shorter (zero padded, see
            ``llmq.quant.primitives``).
        symmetric: symmetric (zero point fixed at ``2**(bits-1)``, no zeros stored)
            or asymmetric (a zero point per group).
        zero_point: asymmetric only: ``"int"`` (uint8 zero codes) or ``"float"`` (a float per group,
            ``--method hqq`` only); ``None`` = the method's default (``default_zero_point``):
            ``"float"`` for HQQ at 2-4 bits (its solver moves the zero off the integer grid) and
            ``"int"`` otherwise. Symmetric recipes store no zero point: leave it ``None``.
        method: algorithm producing the codes.
        include: fnmatch patterns over module names; a Linear is quantized only if
            it matches one of them (``("*",)`` = every Linear).
        exclude: fnmatch patterns; a match wins over ``include``.
        method_args: algorithm parameters recorded for reproducibility (e.g. GPTQ
            damping); plain JSON values only, or the method's typed options (``llmq.options``,
            stored as their dict; ``options`` reads them back typed).
        levels: where a code's values lie (``llmq.quant.levels``): ``"uniform"`` (the integer grid,
            default; configs written before levels existed load as uniform) or ``"nf"``, ``"kmeans"``,
            ``"log2"`` (2-4 bits) and ``"binary"`` (1 bit). Non-uniform levels are symmetric
            (``symmetric=True``, no zero points) and run with ``method`` rtn or gptq.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    method: WeightMethod = WeightMethod.RTN
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    method_args: dict[str, Any] = field(default_factory=dict)
    zero_point: ZeroPoint | None = None
    levels: Levels = Levels.UNIFORM

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "levels", Levels(self.levels))
        except ValueError:
            raise ValueError(f"unknown levels {self.levels!r}: choose one of {[v.value for v in Levels]}") from None
        if self.levels is not Levels.UNIFORM:
            self._check_levels()
        elif self.bits == 1:
            raise ValueError("1-bit weights exist only as binary levels: pass levels='binary' (--levels binary)")
        elif self.bits not in SUPPORTED_WEIGHT_BITS:
            raise ValueError(f"unsupported weight bits {self.bits!r}: choose one of {SUPPORTED_WEIGHT_BITS}")
        if self.group_size is not None and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"unsupported group size {self.group_size!r}: choose one of {SUPPORTED_GROUP_SIZES} "
                f"or None (CLI: 'channel') for one group per output channel"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        try:
            object.__setattr__(self, "method", WeightMethod(self.method))
        except ValueError:
            raise ValueError(f"unknown method {self.method!r}: choose one of {[m.value for m in WeightMethod]}") from None
        object.__setattr__(self, "include", _check_patterns("include", self.include))
        object.__setattr__(self, "exclude", _check_patterns("exclude", self.exclude))
        if hasattr(self.method_args, "to_dict"):  # typed options (llmq.options): kept as their JSON dict
            object.__setattr__(self, "method_args", self.method_args.to_dict())
        if not isinstance(self.method_args, dict):
            raise ValueError(f"method_args must be a dict of JSON values, got {type(self.method_args).__name__}")
        object.__setattr__(self, "zero_point", self._resolve_zero_point())

    def _check_levels(self) -> None:
        allowed = LEVEL_BITS[self.levels]
        if self.bits not in allowed:
            fix = "levels='binary' is 1 bit: pass bits=1 (--bits 1)" if self.levels is Levels.BINARY else \
                f"choose bits from {allowed}"
            raise ValueError(f"{self.bits}-bit {self.levels.value} levels are not supported: {fix}")
        if not self.symmetric or self.zero_point is not None:
            raise ValueError(f"{self.levels.value} levels are symmetric (a codebook times a scale, no zero point): "
                             "pass symmetric=True (--sym) and no zero_point, or use levels='uniform' for zero points")
        method = WeightMethod(self.method)
        if method not in LEVEL_METHODS:
            raise ValueError(f"--method {method.value} quantizes to the uniform grid only; {self.levels.value} "
                             f"levels run with {[m.value for m in LEVEL_METHODS]}")

    def _resolve_zero_point(self) -> ZeroPoint | None:
        if self.zero_point is not None:
            try:
                zp = ZeroPoint(self.zero_point)
            except ValueError:
                raise ValueError(f"unknown zero_point {self.zero_point!r}: choose one of "
                                 f"{[z.value for z in ZeroPoint]}") from None
        else:
            zp = None
        if self.symmetric:
            if zp is not None:
                raise ValueError("symmetric recipes store no zero point (it is fixed at 2**(bits-1)): drop "
                                 "zero_point / --zero-point, or quantize asymmetrically (--asym)")
            return None
        if zp is None:
            return default_zero_point(self.method, self.bits)
        if zp is ZeroPoint.FLOAT and self.method not in FLOAT_ZERO_METHODS:
            raise ValueError(f"zero_point='float' is produced by {[m.value for m in FLOAT_ZERO_METHODS]} only, "
                             f"not {self.method.value!r}: use zero_point='int' or --method hqq")
        return zp

    @property
    def options(self):
        """``method_args`` as the method's typed options (``llmq.options``); a bad key or value: ``ValueError``."""
        from llmq.options import options_for

        return options_for(self.method, self.method_args)

    def matches(self, module_name: str) -> bool:
        """True if a module of this name should be quantized (include minus exclude)."""
        included = any(fnmatch.fnmatchcase(module_name, p) for p in self.include)
        excluded = any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude)
        return included and not excluded

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "method": self.method.value,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "method_args": dict(self.method_args),
            "zero_point": None if self.zero_point is None else self.zero_point.value,
            "levels": self.levels.value,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeightRecipe":
        if not d.get("symmetric", cls.symmetric) and "zero_point" not in d:
            d = {**d, "zero_point": ZeroPoint.INT.value}  # written before float zeros existed: integer zeros
        return _from_dict(cls, d, "weight")

