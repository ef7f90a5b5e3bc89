"""Quantization recipes: frozen, validated, JSON round-trippable descriptions of *what* to do.

A recipe never holds tensors. It is written verbatim into a checkpoint's
``config.json`` (``quantization_config.recipe``) together with
``FORMAT_VERSION``, so a loader can rebuild exactly the modules that produced
the checkpoint and refuse checkpoints written by a format it does not know.

Choices are ``str`` enums whose values are the CLI spellings and the JSON
values, one to one.

The recipes live in one module per job (``weight``, ``activation``, ``kv``; ``schema`` holds the
format version and the strict ``from_dict`` parsing they share); every public name is importable
from ``llmq.recipes``.
"""

from llmq.recipes.activation import (
    DEFAULT_SMOOTHQUANT_ALPHA, SCHEME_DEFAULT, SUPPORTED_ACT_BITS, ActGranularity, ActivationRecipe, ActScheme,
    ObserverKind,
)
from llmq.recipes.kv import SUPPORTED_KV_BITS, SUPPORTED_KV_GROUP_SIZES, KVAxis, KVRecipe
from llmq.recipes.schema import FORMAT_VERSION, check_format_version
from llmq.recipes.weight import (
    DEFAULT_EXCLUDE, FLOAT_ZERO_MAX_BITS, FLOAT_ZERO_METHODS, LEVEL_BITS, LEVEL_METHODS, SUPPORTED_GROUP_SIZES,
    SUPPORTED_WEIGHT_BITS, Levels, WeightMethod, WeightRecipe, ZeroPoint, default_zero_point,
)

__all__ = [
    "FORMAT_VERSION", "check_format_version",
    "SUPPORTED_WEIGHT_BITS", "SUPPORTED_GROUP_SIZES", "DEFAULT_EXCLUDE", "FLOAT_ZERO_METHODS", "FLOAT_ZERO_MAX_BITS",
    "WeightMethod", "ZeroPoint", "WeightRecipe", "default_zero_point", "Levels", "LEVEL_BITS", "LEVEL_METHODS",
    "SUPPORTED_ACT_BITS", "ActScheme", "ActGranularity", "ObserverKind", "DEFAULT_SMOOTHQUANT_ALPHA", "SCHEME_DEFAULT",
    "ActivationRecipe",
    "SUPPORTED_KV_BITS", "SUPPORTED_KV_GROUP_SIZES", "KVAxis", "KVRecipe",
]
