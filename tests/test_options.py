"""Typed per-method options (llmq.options): defaults, validation, the recipe's JSON, old checkpoints' configs."""

import pytest

from llmq.checkpoint.config import validate_quantization_config
from llmq.options import AWQOptions, GPTQOptions, HQQOptions, RTNOptions, options_for
from llmq.pipeline.methods import METHOD_DEFAULTS, method_args
from llmq.recipes import WeightMethod, WeightRecipe

# the quantization_config of a GPTQ checkpoint written before llmq.options existed (format 1, llmq 0.x):
# method_args is the plain dict the pipeline recorded, calibration included
OLD_GPTQ_CONFIG = {
    "quant_method": "llmq", "format_version": 1, "llmq_version": "0.1.0",
    "weight": {"bits": 4, "group_size": 128, "symmetric": False, "method": "gptq", "include": ["*"],
               "exclude": ["lm_head", "*embed*"], "zero_point": "int",
               "method_args": {"blocksize": 128, "percdamp": 0.05, "act_order": False, "clip_search": True,
                               "expert_min_tokens": 64, "expert_fallback": "pooled",
                               "calibration": {"source": "bbc", "nsamples": 128, "seqlen": 512, "seed": 0}}},
    "modules": {"model.layers.0.self_attn.q_proj": {"kind": "quant_linear", "bits": 4, "group_size": 128}},
}


def test_an_old_style_config_loads_and_reads_back_typed():
    validate_quantization_config(OLD_GPTQ_CONFIG, "config.json")
    recipe = WeightRecipe.from_dict(OLD_GPTQ_CONFIG["weight"])
    assert recipe.options == GPTQOptions(percdamp=0.05, act_order=False)
    assert recipe.method_args["calibration"]["nsamples"] == 128  # the record survives untouched


@pytest.mark.parametrize("method, cls", [("rtn", RTNOptions), ("gptq", GPTQOptions), ("awq", AWQOptions),
                                         ("hqq", HQQOptions)], ids=["rtn", "gptq", "awq", "hqq"])
def test_defaults_are_the_recorded_method_args(method, cls):
    assert options_for(method) == cls()
    assert method_args(WeightRecipe(method=method)) == METHOD_DEFAULTS[WeightMethod(method)] == cls().to_dict()


def test_recipe_holds_typed_options_as_their_dict():
    recipe = WeightRecipe(method="awq", method_args=AWQOptions(scale_loss="linear", n_grid=10))
    assert recipe.method_args["scale_loss"] == "linear" and recipe.options.n_grid == 10
    assert WeightRecipe.from_dict(recipe.to_dict()) == recipe
    # the order recorded before, expert_chunk (added later) last
    assert list(recipe.method_args)[-3:] == ["expert_min_tokens", "expert_fallback", "expert_chunk"]


@pytest.mark.parametrize("method, args, phrase", [
    ("gptq", {"damp": 0.1}, r"unknown gptq arguments \['damp'\]"),
    ("hqq", {"keep": "layer"}, "hqq keep must be 'group'"),
    ("awq", {"scale_loss": "mse"}, "awq scale_loss must be 'block'"),
    ("awq", {"block_windows": 0}, "block_windows must be a positive"),
    ("gptq", {"expert_fallback": "skip"}, "expert_fallback must be one of"),
    ("awq", {"expert_chunk": -1}, "expert_chunk must be an integer >= 0"),
    ("gptq", {"blocksize": 0}, "gptq blocksize must be a positive integer"),
    ("gptq", {"percdamp": -1}, "percdamp must be a number >= 0"),
    ("smoothquant", {}, "does not run in the weight-only layer pipeline"),
], ids=["unknown", "hqq-keep", "awq-loss", "awq-windows", "fallback", "chunk", "blocksize", "percdamp", "smoothquant"])
def test_bad_options_are_refused_by_name(method, args, phrase):
    with pytest.raises(ValueError, match=phrase):
        options_for(method, args)


def test_options_of_another_method_are_refused():
    with pytest.raises(ValueError, match="HQQOptions are not options of method 'gptq'"):
        options_for("gptq", HQQOptions())
