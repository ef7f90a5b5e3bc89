import json

import pytest

from llmq.recipes import FORMAT_VERSION, WeightMethod, WeightRecipe, check_format_version


def test_json_round_trip():
    r = WeightRecipe(bits=3, group_size=None, symmetric=True, method="gptq", exclude=["lm_head"],
                     method_args={"damp": 0.01})
    d = json.loads(json.dumps(r.to_dict()))
    assert WeightRecipe.from_dict(d) == r
    assert r.method is WeightMethod.GPTQ


@pytest.mark.parametrize("kw, match", [
    (dict(bits=5), r"unsupported weight bits 5: choose one of \(2, 3, 4, 8\)"),
    (dict(group_size=100), r"unsupported group size 100: choose one of \(32, 64, 128, 256\)"),
    (dict(method="magic"), r"unknown method 'magic'"),
    (dict(exclude="lm_head"), r"list of fnmatch patterns"),
])
def test_validation_messages(kw, match):
    with pytest.raises(ValueError, match=match):
        WeightRecipe(**kw)


def test_zero_point_defaults_and_validation():
    from llmq.recipes import ZeroPoint

    assert WeightRecipe(4, 64, False, method="hqq").zero_point is ZeroPoint.FLOAT  # HQQ's own form
    assert WeightRecipe(2, 64, False, method="hqq").zero_point is ZeroPoint.FLOAT
    assert WeightRecipe(8, None, False, method="hqq").zero_point is ZeroPoint.INT  # chosen on held-out text
    assert WeightRecipe(8, None, False, method="hqq", zero_point="float").zero_point is ZeroPoint.FLOAT
    assert WeightRecipe(4, 64, False, method="gptq").zero_point is ZeroPoint.INT
    assert WeightRecipe(4, 64, False, method="hqq", zero_point="int").zero_point is ZeroPoint.INT
    assert WeightRecipe(4, 64, True, method="hqq").zero_point is None  # symmetric: no zero stored
    r = WeightRecipe(4, 64, False, method="hqq")
    assert WeightRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    # a recipe written before zero_point existed meant integer zeros, whatever the method
    old = {k: v for k, v in r.to_dict().items() if k != "zero_point"}
    assert WeightRecipe.from_dict(old).zero_point is ZeroPoint.INT
    with pytest.raises(ValueError, match="symmetric recipes store no zero point"):
        WeightRecipe(4, 64, True, method="hqq", zero_point="float")
    with pytest.raises(ValueError, match=r"zero_point='float' is produced by \['hqq'\] only, not 'gptq'"):
        WeightRecipe(4, 64, False, method="gptq", zero_point="float")
    with pytest.raises(ValueError, match="unknown zero_point 'half'"):
        WeightRecipe(4, 64, False, zero_point="half")


def test_unknown_fields_rejected():
    with pytest.raises(ValueError, match="unknown weight-recipe fields"):
        WeightRecipe.from_dict({"bits": 4, "colour": "red"})


def test_default_excludes_head_and_embeddings():
    r = WeightRecipe()
    assert r.matches("model.layers.0.self_attn.q_proj")
    assert not r.matches("lm_head")
    assert not r.matches("model.embed_tokens")


def test_frozen():
    with pytest.raises(Exception):
        WeightRecipe().bits = 8


def test_format_version_check():
    check_format_version(FORMAT_VERSION, "x")
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        check_format_version(99, "ckpt")
