"""The on-disk side of recipes: the checkpoint format version and strict parsing of ``to_dict`` forms.

Every recipe is written verbatim into a checkpoint's ``config.json`` together with
``FORMAT_VERSION``; a loader refuses versions it does not know and fields it does not know.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

# Bump when the on-disk layout of QuantLinear buffers or the recipe schema changes
# in a way an older loader would misread.
FORMAT_VERSION = 1


def _from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """Build recipe ``cls`` from its ``to_dict`` form, refusing unknown fields by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what}-recipe fields {sorted(unknown)}; known fields are {sorted(known)}")
    return cls(**d)


def _enum(cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}: choose one of {[m.value for m in cls]}") from None


def check_format_version(version: Any, where: str) -> None:
    """Raise unless ``version`` is a checkpoint format this llmq can read."""
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: llmq checkpoint format version {version!r} is not supported by this llmq "
            f"(reads version {FORMAT_VERSION}); upgrade llmq or re-quantize the model"
        )
