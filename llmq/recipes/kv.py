"""KV-cache recipe: how cached keys and values are quantized during generation."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from llmq.recipes.schema import _from_dict

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
