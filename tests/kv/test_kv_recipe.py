import json

import pytest

from llmq.recipes import KVAxis, KVRecipe


def test_json_round_trip():
    r = KVRecipe(bits=2, key_axis="token", group_size=32, symmetric=True, residual_length=0)
    d = json.loads(json.dumps(r.to_dict()))
    assert KVRecipe.from_dict(d) == r
    assert r.key_axis is KVAxis.TOKEN and r.value_axis is KVAxis.TOKEN


def test_defaults_are_kivi_like():
    r = KVRecipe()
    assert (r.bits, r.key_axis, r.value_axis, r.residual_length) == (4, KVAxis.CHANNEL, KVAxis.TOKEN, 128)
    assert r.flush_block == r.group_size
    assert KVRecipe(key_axis="token").flush_block == 8  # whole words of int4 codes packed along the tokens
    assert KVRecipe(key_axis="token", bits=2).flush_block == 16 and KVRecipe(bits=2, group_size=16).flush_block == 16


@pytest.mark.parametrize("kw, match", [
    pytest.param(dict(bits=3), r"unsupported KV-cache bits 3: choose one of \(2, 4, 8\)", id="bits3"),
    pytest.param(dict(residual_length=-1), "residual_length must be an integer >= 0", id="residual-negative"),
    pytest.param(dict(group_size=48), r"unsupported KV group size 48", id="group48"),
    pytest.param(dict(key_axis="head"), r"unknown key_axis 'head'", id="axis"),
    pytest.param(dict(value_axis="channel"), "value_axis must be 'token'", id="value-channel"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        KVRecipe(**kw)


def test_group_must_divide_head_dim():
    KVRecipe(group_size=32).check_head_dim(96)
    with pytest.raises(ValueError, match=r"KV group size 64 does not divide the model's head_dim 96: choose one of "
                                         r"\[16, 32\]"):
        KVRecipe(group_size=64).check_head_dim(96)


def test_unknown_fields_rejected():
    with pytest.raises(ValueError, match="unknown KV-recipe fields"):
        KVRecipe.from_dict({"bits": 4, "colour": "red"})
