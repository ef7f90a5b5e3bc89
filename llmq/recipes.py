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


class WeightMethod(str, Enum):
    """Algorithm that turns float weights into integer codes."""

    RTN = "rtn"  # round to nearest, no data
    GPTQ = "gptq"
    AWQ = "awq"
    HQQ = "hqq"
    SMOOTHQUANT = "smoothquant"


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
            or asymmetric (integer zero point per group).
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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeightRecipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown weight-recipe fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)


def check_format_version(version: Any, where: str) -> None:
    """Raise unless ``version`` is a checkpoint format this llmq can read."""
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: llmq checkpoint format version {version!r} is not supported by this llmq "
            f"(reads version {FORMAT_VERSION}); upgrade llmq or re-quantize the model"
        )
