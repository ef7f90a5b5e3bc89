"""Quantization-aware training: STE gradients, learned scales, exact conversion, distillation."""

import copy
import json

import pytest
import torch
from conftest import make_tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM

import llmq
from llmq.checkpoint import build_quantization_config, save_quantized
from llmq.model.rtn import quantize_model_rtn
from llmq.nn.backends import dequantize_packed
from llmq.qat import FakeQuantLinear, convert_qat, distill, fp16_ste, prepare_qat, qat_parameters, round_ste
from llmq.quant.primitives import quantize_weight
from llmq.recipes import WeightRecipe


def test_round_ste_rounds_forward_and_passes_gradients_through():
    x = torch.tensor([-1.6, -0.5, 0.2, 0.5, 1.5, 2.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    (y * torch.arange(6.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(6.0))
    s = torch.tensor([0.1, 1 / 3], requires_grad=True)
    assert torch.equal(fp16_ste(s), s.detach().half().float())
    fp16_ste(s).sum().backward()
    assert torch.equal(s.grad, torch.ones(2))


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([32, 64, None]), symmetric=st.booleans(),
       k=st.integers(1, 150), seed=st.integers(0, 2**31 - 1))
def test_fake_quant_at_start_is_rtn_and_converts_exactly(bits, group, symmetric, k, seed):
    """Before any training the fake-quantized weight is RTN's dequantized weight, and the converted
    QuantLinear holds exactly the weight the forward used (awkward K: padded last groups)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, 7, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(7, k, generator=g))
    fq = FakeQuantLinear(linear, bits, group, symmetric)
    rtn = quantize_weight(linear.weight.data, bits, group, symmetric)
    w = fq.fake_quantized_weight().detach()
    assert torch.equal(w, rtn.dequantize())
    ql = fq.to_quant_linear()
    assert isinstance(ql, llmq.QuantLinear) and torch.equal(dequantize_packed(ql).t(), w)
    x = torch.randn(3, k, generator=g)
    ql.set_backend("torch")  # exactness is the reference's; the automatic `cpu` backend computes in bf16
    torch.testing.assert_close(ql(x), fq(x), rtol=1e-5, atol=1e-5)


def test_gradients_reach_weights_and_scales_and_stop_at_saturation():
    linear = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4, 64) * 0.1)
    fq = FakeQuantLinear(linear, 4, 32, True)
    with torch.no_grad():
        fq.scale.mul_(0.5)  # half the range: the largest weights now saturate
    fq.fake_quantized_weight().sum().backward()
    code = torch.round(fq.weight.detach() / fq.scale.detach().half().float().repeat_interleave(32, 1) + 8)
    inside = ((code >= 0) & (code <= 15)).float()
    assert fq.weight.grad is not None and fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    assert torch.equal(fq.weight.grad, inside)  # clipped STE: 1 inside the grid, 0 where clamped
    assert 0 < inside.mean() < 1


def test_prepare_and_convert_a_model():
    model = make_tiny_llama()
    rtn = copy.deepcopy(model)
    recipe = WeightRecipe(4, 32, False)
    names = prepare_qat(model, recipe)
    assert len(names) == 14 and all(isinstance(model.get_submodule(n), FakeQuantLinear) for n in names)
    assert type(model.lm_head) is nn.Linear  # excluded by the default recipe
    weights, scales = qat_parameters(model)
    assert len(scales) == 14 and len(weights) == 14  # no biases in Llama
    quantize_model_rtn(rtn, recipe, progress=False)
    llmq.nn.set_backend(rtn, "torch")  # the fp32 reference (the automatic cpu backend computes in bf16)
    x = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        fake = model(x).logits
        torch.testing.assert_close(fake, rtn(x).logits, rtol=1e-4, atol=1e-4)  # untrained = RTN
    assert convert_qat(model) == 14
    assert all(isinstance(model.get_submodule(n), llmq.QuantLinear) for n in names)
    llmq.nn.set_backend(model, "torch")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, fake, rtol=1e-4, atol=1e-4)


def test_distillation_lowers_the_kl_and_the_checkpoint_loads(tmp_path):
    """A few steps on a tiny Llama lower KL(teacher ‖ student) on the training windows; the converted
    model saves and loads with plain from_pretrained, method "qat" recorded."""
    teacher = make_tiny_llama()
    with torch.no_grad():  # give the teacher confident predictions, so there is something to match
        teacher.lm_head.weight.mul_(20)
    student = copy.deepcopy(teacher)
    before = copy.deepcopy(teacher.state_dict())
    recipe = WeightRecipe(2, 32, False, method="qat", method_args={"steps": 40})
    prepare_qat(student, recipe)
    windows = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    result = distill(student, teacher, windows, steps=40, batch_size=4, lr=3e-3, scale_lr=3e-3, progress=False)
    assert len(result.losses) == 40 and result.losses[-1] < 0.5 * result.losses[0]
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), before.values()))  # untouched
    convert_qat(student)
    out = save_quantized(student, None, tmp_path / "qat", build_quantization_config(student, recipe))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight"]["method"] == "qat"
    x = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)


def test_bad_input():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="QAT keeps integer zero points"):
        prepare_qat(model, WeightRecipe(4, 32, False, method="hqq"))  # hqq's default is float zeros
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        prepare_qat(model, WeightRecipe(4, 32, False, include=("nothing*",)))
    with pytest.raises(ValueError, match="call llmq.qat.prepare_qat"):
        distill(model, model, torch.zeros(2, 4, dtype=torch.long), steps=1, progress=False)
    prepare_qat(model, WeightRecipe(4, 32, False))
    with pytest.raises(ValueError, match="non-empty"):
        distill(model, make_tiny_llama(), torch.zeros(0, 4, dtype=torch.long), steps=1, progress=False)
    bad = nn.Linear(8, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        FakeQuantLinear(bad, 4, None, True, name="bad")


def test_the_layer_pipeline_points_qat_to_its_own_api(tiny_model_dir):
    from llmq.pipeline import quantize_layerwise

    with pytest.raises(ValueError, match=r"QAT trains the model: llmq.qat, scripts/qat_finetune.py"):
        quantize_layerwise(tiny_model_dir, WeightRecipe(4, 32, False, method="qat"), progress=False)
