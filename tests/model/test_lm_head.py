"""``--lm-head`` / ``quantize(..., lm_head=)``: the output head quantized, a tied one untied, saved and loaded."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq
from conftest import make_tiny_llama, save_model_dir
from llmq.api import quantize
from llmq.cli.main import main
from llmq.model.lm_head import HEAD_FORMATS, LmHead, quantize_lm_head
from llmq.nn import set_backend
from llmq.recipes import WeightRecipe


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A tiny Llama whose head *is* its embedding (``tie_word_embeddings``), saved like a hub download."""
    model = make_tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights(recompute_mapping=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return save_model_dir(model, tmp_path_factory.mktemp("tied") / "tied-llama")


def _logits(model, ids, backend):
    set_backend(model, backend)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("choice", ["int8", "int4"])
def test_tied_head_quantized_saved_and_loaded(tied_dir, tmp_path, capsys, choice):
    """CLI → checkpoint → plain from_pretrained: the head is a QuantLinear of the chosen format, the embedding
    is the source's float tensor bit for bit, and the logits match the in-memory model on the torch reference
    backend (exactly on that backend, within bf16 rounding on the automatic cpu backend)."""
    out = tmp_path / "q"
    assert main(["quantize", str(tied_dir), "--out", str(out), "--lm-head", choice, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lm_head"] == choice and summary["linears"] == 15  # 14 projections + the head

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["lm_head"] == choice
    bits, group, sym = HEAD_FORMATS[LmHead(choice)]
    assert config["quantization_config"]["modules"]["lm_head"] == {
        "kind": "quant_linear", "in_features": 64, "out_features": 320, "bits": bits, "group_size": group,
        "symmetric": sym}

    source = AutoModelForCausalLM.from_pretrained(tied_dir)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.lm_head, llmq.QuantLinear) and loaded.lm_head.bits == bits
    assert type(loaded.model.embed_tokens) is torch.nn.Embedding
    assert torch.equal(loaded.model.embed_tokens.weight, source.model.embed_tokens.weight)

    reference = quantize(tied_dir, WeightRecipe(), lm_head=choice, progress=False).model
    ids = torch.randint(0, 320, (2, 13))
    ref = _logits(reference, ids, "torch")
    assert torch.equal(_logits(loaded, ids, "torch"), ref)
    auto = _logits(loaded, ids, None)
    assert loaded.lm_head.backend_for(ids.float()).name == "cpu"
    torch.testing.assert_close(auto, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    with torch.no_grad():
        float_logits = source(ids).logits
    assert not torch.equal(ref, float_logits)  # the head (and the layers) really are quantized


def test_quantizing_leaves_the_embedding_untouched_in_memory(tied_dir):
    """The tied tensor is only read: after the swap the embedding holds the same values, the head does not
    alias it, and transformers' tie map no longer names the head (a later tie_weights() cannot re-tie it)."""
    model = AutoModelForCausalLM.from_pretrained(tied_dir)
    before = model.model.embed_tokens.weight.detach().clone()
    quantize_lm_head(model, "int8")
    assert torch.equal(model.model.embed_tokens.weight, before)
    assert isinstance(model.lm_head, llmq.QuantLinear) and not model.config.tie_word_embeddings
    assert not any(k.startswith("lm_head.") for k in model.all_tied_weights_keys)
    model.tie_weights()
    assert isinstance(model.lm_head, llmq.QuantLinear) and "weight" not in dict(model.lm_head.named_parameters())


def test_untied_head_and_layerwise_path(tiny_model_dir):
    """An untied head (its own tensor) through the layer pipeline (--method hqq): quantized from its own
    weight, within the int4 rounding of the float head."""
    result = quantize(tiny_model_dir, WeightRecipe(4, 64, method="hqq"), lm_head="int4", progress=False)
    head = result.model.lm_head
    assert isinstance(head, llmq.QuantLinear) and (head.bits, head.group_size) == (4, 64)
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.randn(5, 64)
    set_backend(result.model, "torch")
    with torch.no_grad():
        ref, got = source.lm_head(x), head(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (got - ref).pow(2).sum())
    assert sqnr > 15, f"int4 g64 head SQNR {sqnr:.1f} dB"
    assert result.summary.linears == 15


def test_default_keeps_the_head_float_and_tied(tied_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tied_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head" not in config["quantization_config"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.lm_head) is torch.nn.Linear and loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_bad_choices_are_refused(tied_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown lm_head choice 'int3'"):
        quantize_lm_head(make_tiny_llama(), "int3")
    with pytest.raises(ValueError, match="'float'"):
        quantize(tied_dir, WeightRecipe(), lm_head="fp8", progress=False)
    with pytest.raises(SystemExit):
        main(["quantize", str(tied_dir), "--out", str(tmp_path / "x"), "--lm-head", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    assert main(["quantize", str(tied_dir), "--out", str(tmp_path / "y"), "--method", "smoothquant",
                 "--lm-head", "int8"]) != 0
    assert "--lm-head does not apply to --method smoothquant" in capsys.readouterr().err
    model = make_tiny_llama()
    quantize_lm_head(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_lm_head(model, "int4")
