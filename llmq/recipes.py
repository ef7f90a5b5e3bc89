"""Quantization recipes: frozen, validated, JSON round-trippable descriptions of *what* to do.

A recipe never holds tensors. It is written verbatim into a checkpoint's
``config.json`` (``quantization_config.recipe``) together with
``FORMAT_VERSION``, so a loader can rebuild exactly the modules that produced
the checkpoint and refuse checkpoints written by a format it does not know.

Choices are ``str`` enums whose values are the CLI spellings and the JSON
values, one to one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Bump when the on-disk layout of QuantLinear buffers or the recipe schema changes
# in a way an older loader would misread.
FORMAT_VERSION = 1

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)

# Modules that are never quantized unless a user includes them explicitly:
# the output head and the embeddings are the most sensitive layers of an LLM
# and, when tied, share one tensor.
DEFAULT_EXCLUDE = ("lm_head", "*embed*")


def _from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """Build recipe ``cls`` from its ``to_dict`` form, refusing unknown fields by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what}-recipe fields {sorted(unknown)}; known fields are {sorted(known)}")
    return cls(**d)


class WeightMethod(str, Enum):
    """Algorithm that turns float weights into integer codes."""

    RTN = "rtn"  # round to nearest, no data
    GPTQ = "gptq"
    AWQ = "awq"
    HQQ = "hqq"
    SMOOTHQUANT = "smoothquant"
    QAT = "qat"  # quantization-aware training (llmq.qat / scripts/qat_finetune.py), not a one-shot quantizer


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
            damping); plain JSON values only.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    method: WeightMethod = WeightMethod.RTN
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    method_args: dict[str, Any] = field(default_factory=dict)
    zero_point: ZeroPoint | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_WEIGHT_BITS:
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
        if not isinstance(self.method_args, dict):
            raise ValueError(f"method_args must be a dict of JSON values, got {type(self.method_args).__name__}")
        object.__setattr__(self, "zero_point", self._resolve_zero_point())

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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeightRecipe":
        if not d.get("symmetric", cls.symmetric) and "zero_point" not in d:
            d = {**d, "zero_point": ZeroPoint.INT.value}  # written before float zeros existed: integer zeros
        return _from_dict(cls, d, "weight")


def check_format_version(version: Any, where: str) -> None:
    """Raise unless ``version`` is a checkpoint format this llmq can read."""
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: llmq checkpoint format version {version!r} is not supported by this llmq "
            f"(reads version {FORMAT_VERSION}); upgrade llmq or re-quantize the model"
        )


# ---------------------------------------------------------------------------
# Activation quantization (W8A8)
# ---------------------------------------------------------------------------

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


def _enum(cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}: choose one of {[m.value for m in cls]}") from None


# ---------------------------------------------------------------------------------------------
# KV-cache recipe
# ---------------------------------------------------------------------------------------------

SUPPORTED_KV_BITS = (2, 4, 8)
SUPPORTED_KV_GROUP_SIZES = (16, 32, 64, 128)


class KVAxis(str, Enum):
    """Which axis shares one scale/zero in the quantized KV cache.

    ``channel``: one scale per channel over a group of ``group_size`` consecutive *tokens*
    (KIVI's choice for keys: key outliers live in fixed channels).
    ``token``: one scale per token over a group of ``group_size`` consecutive *channels*
    of the head dimension (the only choice for values).
    """

    CHANNEL = "channel"
    TOKEN = "token"


@dataclass(frozen=True)
class KVRecipe:
    """How to quantize the key/value cache during generation.

    Attributes:
        bits: code width of cached keys and values, one of ``SUPPORTED_KV_BITS``.
        key_axis: ``channel`` (KIVI) or ``token``; see ``KVAxis``.
        value_axis: always ``token`` (per-channel values would need a whole group of
            future tokens before any value could be stored; KIVI shows per-token is right).
        group_size: tokens per group for per-channel keys, channels per group for per-token
            keys/values; must divide the model's ``head_dim`` (checked by
            ``check_head_dim`` once the model config is known).
        symmetric: symmetric (zero fixed at ``2**(bits-1)``, not stored) or asymmetric
            (a uint8 zero point per group).
        residual_length: the most recent tokens kept in full precision. A token is
            quantized once, when it leaves this window, in blocks of ``flush_block`` tokens
            (per-channel keys: ``group_size``; per-token keys: ``32 // bits``, one word of codes),
            so between ``residual_length`` and ``residual_length + flush_block - 1`` tokens
            are full precision.
    """

    bits: int = 4
    key_axis: KVAxis = KVAxis.CHANNEL
    value_axis: KVAxis = KVAxis.TOKEN
    group_size: int = 64
    symmetric: bool = False
    residual_length: int = 128

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_KV_BITS:
            raise ValueError(f"unsupported KV-cache bits {self.bits!r}: choose one of {SUPPORTED_KV_BITS} "
                             f"(3-bit codes do not tile a head dimension of 64/128 in int32 words)")
        for name in ("key_axis", "value_axis"):
            try:
                object.__setattr__(self, name, KVAxis(getattr(self, name)))
            except ValueError:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: choose one of "
                                 f"{[a.value for a in KVAxis]}") from None
        if self.value_axis is not KVAxis.TOKEN:
            raise ValueError("value_axis must be 'token': per-channel values would have to wait for a whole "
                             "group of future tokens before any value could be stored")
        if self.group_size not in SUPPORTED_KV_GROUP_SIZES:
            raise ValueError(f"unsupported KV group size {self.group_size!r}: choose one of "
                             f"{SUPPORTED_KV_GROUP_SIZES} (it must also divide the model's head_dim)")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        if not isinstance(self.residual_length, int) or isinstance(self.residual_length, bool) \
                or self.residual_length < 0:
            raise ValueError(f"residual_length must be an integer >= 0 (number of recent tokens kept in full "
                             f"precision), got {self.residual_length!r}")

    @property
    def flush_block(self) -> int:
        """Tokens quantized at once when they leave the residual window: whole int32 words of
        codes packed along the tokens (``P = 32 // bits``, ``llmq.quant.kv``) and, for per-channel
        keys, whole token groups (every supported group is a multiple of every ``P``)."""
        from llmq.quant.packing import codes_per_word

        p = codes_per_word(self.bits)
        return max(self.group_size, p) if self.key_axis is KVAxis.CHANNEL else p

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` unless this recipe fits a model whose attention heads are ``head_dim`` wide."""
        from llmq.quant.packing import codes_per_word

        if head_dim % self.group_size:
            divisors = [g for g in SUPPORTED_KV_GROUP_SIZES if head_dim % g == 0]
            raise ValueError(f"KV group size {self.group_size} does not divide the model's head_dim {head_dim}: "
                             f"choose one of {divisors}")
        p = codes_per_word(self.bits)
        if head_dim % p:
            raise ValueError(f"head_dim {head_dim} is not a multiple of {p}, the number of {self.bits}-bit codes "
                             f"per int32 word; use bits=8 for this model")

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "key_axis": self.key_axis.value,
            "value_axis": self.value_axis.value,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "residual_length": self.residual_length,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVRecipe":
        return _from_dict(cls, d, "KV")
