"""Every method on a tiny random model of every mapped family; AWQ and SmoothQuant find every subgroup
of the map and every fold passes the float check; unknown families; a wrong map is caught."""

import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import llmq.arch.maps as maps
from llmq.algorithms import AWQ
from llmq.arch import ArchMap, FoldError, NormKind, Producer, arch_for
from llmq.nn.quant_linear import QuantLinear
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.pipeline import quantize_model
from llmq.recipes import ActivationRecipe, WeightRecipe
from llmq.w8a8 import quantize_model_w8a8

sys.path.insert(0, str(Path(__file__).parent))
from tiny_families import DENSE, FOLDS_PER_LAYER, LAYERS, MOE, calibration_ids, tiny_model  # noqa: E402

SQ = ActivationRecipe(scheme="dynamic", smoothquant_alpha=0.5)


def folds(caplog) -> list[tuple]:
    """``(layer, producer, consumers, relative change)`` of every fold logged by ``llmq.arch.folding``."""
    return [r.args for r in caplog.records if r.name == "llmq.arch" and r.msg.startswith("%s: folded")]


def expected_folds(model) -> set[tuple]:
    return {(f"model.layers.{i}", sub.producer.name, sub.consumers)
            for i, layer in enumerate(model.model.layers) for sub in arch_for(layer).subgroups}


def sqnr_db(ref, y):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum())).item()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "awq"])
@pytest.mark.parametrize("family", DENSE + MOE)
def test_weight_only_methods_run(family, method, caplog):
    model = tiny_model(family)
    ids = calibration_ids()
    ref = logits(model, ids)
    args = {"gqa_fold": True} if method == "awq" else {}  # every subgroup, v -> o under GQA included
    with caplog.at_level(logging.DEBUG, logger="llmq.arch"):
        quantize_model(model, WeightRecipe(8, 32, False, method=method, method_args=args),
                       ids if method in ("gptq", "awq") else None, batch_size=2, progress=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert sqnr_db(ref, logits(model, ids)) > 10  # 15-25 dB measured; a fold left uncompensated gives ~0
    done = folds(caplog)
    if method == "awq":
        assert len(done) == LAYERS * FOLDS_PER_LAYER[family]
        assert {d[:3] for d in done} == expected_folds(model)
        assert max(d[3] for d in done) < 1e-5
    else:
        assert done == []


@pytest.mark.parametrize("family", DENSE)
def test_awq_only_clips_o_proj_under_gqa_by_default(family, caplog):
    """Without gqa_fold, AWQ folds every subgroup of the map but v -> o (the tiny models are GQA: 4 query
    heads over 2 KV heads), and says so at INFO, naming each layer's o_proj."""
    model = tiny_model(family)
    with caplog.at_level(logging.DEBUG, logger="llmq"):
        quantize_model(model, WeightRecipe(8, 32, False, method="awq"), calibration_ids(), batch_size=2,
                       progress=False)
    expected = {(f"model.layers.{i}", sub.producer.name, sub.consumers)
                for i, layer in enumerate(model.model.layers) for sub in arch_for(layer).subgroups if not sub.heads}
    assert {d[:3] for d in folds(caplog)} == expected and len(expected) < len(expected_folds(model))
    told = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "gqa_fold=False" in r.getMessage()]
    assert len(told) == LAYERS and all(f"model.layers.{i}.self_attn.o_proj" in told[i] for i in range(LAYERS))


@pytest.mark.parametrize("family", DENSE + MOE)
def test_w8a8_smoothquant_finds_every_subgroup(family, caplog):
    model = tiny_model(family)
    ids = calibration_ids()
    ref = logits(model, ids)
    with caplog.at_level(logging.DEBUG, logger="llmq.arch"):
        summary = quantize_model_w8a8(model, SQ, list(ids.split(1)), progress=False)
    done = folds(caplog)
    assert len(done) == LAYERS * FOLDS_PER_LAYER[family]
    assert {d[:3] for d in done} == expected_folds(model)
    assert max(d[3] for d in done) < 1e-5
    assert summary.smoothed == sum(len(c) for _, _, c in expected_folds(model))
    assert any(isinstance(m, W8A8Linear) for m in model.modules())
    assert sqnr_db(ref, logits(model, ids)) > 10  # 12.6 (gemma2) to 25 dB measured


def wrong_gemma3_map(monkeypatch):
    """Gemma 3's MLP pointed at post_attention_layernorm (it normalises the attention output)."""
    right = maps._BY_CLASS["Gemma3DecoderLayer"]
    subs = list(right.subgroups)
    subs[2] = replace(subs[2], producer=Producer("post_attention_layernorm", NormKind.ONE_PLUS_W))
    monkeypatch.setitem(maps._BY_CLASS, "Gemma3DecoderLayer", replace(right, subgroups=tuple(subs)))


def test_wrong_map_is_caught_by_smoothquant(monkeypatch):
    wrong_gemma3_map(monkeypatch)
    model = tiny_model("gemma3")
    with pytest.raises(FoldError, match="model.layers.0: folding scales into post_attention_layernorm "
                                        r"\(for mlp.gate_proj, mlp.up_proj\) changed the layer's float output"):
        quantize_model_w8a8(model, SQ, list(calibration_ids().split(1)), progress=False)


def test_wrong_map_is_caught_by_awq(monkeypatch):
    wrong_gemma3_map(monkeypatch)
    real = AWQ.search_scales

    def away_from_one(self, output_loss=None, tie=None):  # the tiny model may prefer s = 1, which any fold keeps
        s = real(self, output_loss, tie)
        g = torch.Generator().manual_seed(0)
        return s if tie is not None else s * (torch.rand(s.shape[0], generator=g) + 0.5)

    monkeypatch.setattr(AWQ, "search_scales", away_from_one)
    model = tiny_model("gemma3")
    with pytest.raises(FoldError, match="model.layers.0: folding scales into post_attention_layernorm"):
        quantize_model(model, WeightRecipe(4, 32, False, method="awq"), calibration_ids(), progress=False)


def test_excluded_consumer_is_compensated(caplog):
    """An excluded k_proj still reads input_layernorm: AWQ's fold scales its float columns too."""
    model = tiny_model("llama")
    k_before = model.model.layers[0].self_attn.k_proj.weight.clone()
    recipe = WeightRecipe(4, 32, False, method="awq", exclude=("lm_head", "*k_proj"),
                          method_args={"gqa_fold": True})  # every subgroup folds, v -> o under GQA included
    with caplog.at_level(logging.DEBUG, logger="llmq.arch"):
        quantize_model(model, recipe, calibration_ids(), progress=False)
    k = model.model.layers[0].self_attn.k_proj
    assert not isinstance(k, QuantLinear) and not torch.equal(k.weight, k_before)
    assert len(folds(caplog)) == LAYERS * 4


@pytest.fixture
def unknown_llama(monkeypatch):
    """A tiny Llama whose decoder layer class has no map (as a new architecture would)."""
    monkeypatch.delitem(maps._BY_CLASS, "LlamaDecoderLayer")
    return tiny_model("llama")


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_unknown_family_runs_the_methods_that_need_no_map(unknown_llama, method):
    ids = calibration_ids()
    ref = logits(unknown_llama, ids)
    quantize_model(unknown_llama, WeightRecipe(8, 32, False, method=method), ids if method == "gptq" else None,
                   progress=False)
    assert sqnr_db(ref, logits(unknown_llama, ids)) > 10


def test_unknown_family_awq_clips_and_warns_naming_each_linear(unknown_llama, caplog):
    with pytest.warns(UserWarning, match="AWQ only clips") as warned, caplog.at_level(logging.DEBUG, "llmq.arch"):
        quantize_model(unknown_llama, WeightRecipe(4, 32, False, method="awq"), calibration_ids(), progress=False)
    text = " ".join(str(w.message) for w in warned)
    assert "LlamaDecoderLayer has no architecture map" in text
    for name, module in unknown_llama.named_modules():
        if isinstance(module, QuantLinear):
            assert name in text
    assert folds(caplog) == []


def test_unknown_family_smoothquant_refuses(unknown_llama):
    with pytest.raises(ValueError, match="model.layers.0: SmoothQuant cannot smooth LlamaDecoderLayer: it has no "
                                         "architecture map"):
        quantize_model_w8a8(unknown_llama, SQ, list(calibration_ids().split(1)), progress=False)


def test_maps_are_complete():
    """Each map names a decoder class once; every dense family maps its norms' parameterisation."""
    classes = [c for m in maps.MAPS for c in m.layer_classes]
    assert len(classes) == len(set(classes))
    gemma = [m for m in maps.MAPS if m.family.startswith("gemma")]
    assert all(s.producer.norm is not NormKind.W for m in gemma for s in m.subgroups)
    assert all(isinstance(m, ArchMap) for m in maps.MAPS)


@pytest.mark.parametrize("family", ["gemma3", "phi3", "qwen3"])
def test_layer_by_layer_from_disk(family, tmp_path, caplog):
    """The disk path (one layer materialised at a time): AWQ (with gqa_fold) and W8A8 + SmoothQuant fold every
    subgroup."""
    from llmq.pipeline import quantize_layerwise
    from llmq.w8a8.layerwise import quantize_layerwise_w8a8

    model = tiny_model(family)
    model.save_pretrained(tmp_path / family)
    ids = calibration_ids()
    with caplog.at_level(logging.DEBUG, logger="llmq.arch"):
        quantize_layerwise(tmp_path / family, WeightRecipe(4, 32, False, method="awq", method_args={"gqa_fold": True}),
                           ids, batch_size=2, progress=False)
        assert {d[:3] for d in folds(caplog)} == expected_folds(model) and len(folds(caplog)) == 8
        caplog.clear()
        quantize_layerwise_w8a8(tmp_path / family, SQ, list(ids.split(1)), batch_size=2, progress=False)
        assert {d[:3] for d in folds(caplog)} == expected_folds(model) and len(folds(caplog)) == 8
