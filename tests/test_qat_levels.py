"""QAT on non-linear levels (binary, nf, log2, kmeans): clipped-STE / LSQ gradients, an RTN start,
exact conversion to a levels ``QuantLinear``, distillation and a checkpoint that loads."""

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
from llmq.nn.backends import dequantize_packed
from llmq.qat import FakeLevelsLinear, FakeQuantLinear, convert_qat, distill, prepare_qat, qat_parameters
from llmq.quant.levels import quantize_weight_levels
from llmq.recipes import WeightRecipe

KINDS = [("binary", 1), ("nf", 2), ("nf", 3), ("nf", 4), ("log2", 3), ("kmeans", 2), ("kmeans", 4)]


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), group=st.sampled_from([32, 64, None]), k=st.integers(1, 150),
       seed=st.integers(0, 2**31 - 1))
def test_fake_levels_start_at_rtn_and_convert_exactly(kind, group, k, seed):
    """Untrained, the fake-quantized weight is the RTN levels weight (data-free), and the converted
    QuantLinear holds exactly the weight the forward used (awkward K: padded last groups)."""
    levels, bits = kind
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, 6, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(6, k, generator=g))
    fq = FakeLevelsLinear(linear, levels, bits, group)
    w = fq.fake_quantized_weight().detach()
    rtn = quantize_weight_levels(linear.weight.data, levels, bits, group)
    assert torch.equal(w, rtn.dequantize())
    ql = fq.to_quant_linear()
    assert ql.levels == levels and torch.equal(dequantize_packed(ql).t(), w)
    ql.set_backend("torch")
    x = torch.randn(3, k, generator=g)
    torch.testing.assert_close(ql(x), fq(x), rtol=1e-5, atol=1e-5)


def test_binary_gradients_are_clipped_ste_and_lsq():
    """Binary: ŵ = sign(w)·s. The weight's gradient is 1 where |w/s| ≤ 1 and 0 beyond; the scale's
    gradient is Σ (sign(v) − v) over the group's weights inside plus Σ ±1 outside (LSQ)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 3, bias=False)
    fq = FakeLevelsLinear(linear, "binary", 1, 32)
    fq.fake_quantized_weight().sum().backward()
    s = fq.scale.detach().half().float().repeat_interleave(32, 1)  # [3, 64]
    v = fq.weight.detach() / s
    inside = (v.abs() <= 1).float()
    assert torch.equal(fq.weight.grad, inside) and 0 < inside.mean() < 1
    level = torch.where(v > 0, 1.0, -1.0)
    expected = torch.where(inside.bool(), level - v, level).view(3, 2, 32).sum(-1)
    torch.testing.assert_close(fq.scale.grad, expected, rtol=1e-5, atol=1e-5)


def test_kmeans_clips_at_each_rows_own_table():
    torch.manual_seed(1)
    fq = FakeLevelsLinear(nn.Linear(40, 4, bias=False), "kmeans", 2, None)
    with torch.no_grad():
        fq.scale.mul_(0.5)  # the largest weights now lie beyond each row's outermost level
    fq.fake_quantized_weight().sum().backward()
    v = fq.weight.detach() / fq.scale.detach().half().float()
    inside = ((v >= fq.codebook[:, :1]) & (v <= fq.codebook[:, -1:])).float()
    assert torch.equal(fq.weight.grad, inside) and 0 < inside.mean() < 1


def test_prepare_distill_convert_binary_and_load(tmp_path):
    """A tiny Llama with binary g32 levels: prepare picks FakeLevelsLinear, distillation lowers the
    KL, conversion gives binary QuantLinears with the same logits, and the checkpoint loads."""
    teacher = make_tiny_llama()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)
    student = copy.deepcopy(teacher)
    recipe = WeightRecipe(1, 32, True, method="qat", method_args={"steps": 40}, levels="binary")
    names = prepare_qat(student, recipe)
    assert len(names) == 14 and all(type(student.get_submodule(n)) is FakeLevelsLinear for n in names)
    assert len(qat_parameters(student)[1]) == 14
    windows = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    result = distill(student, teacher, windows, steps=40, batch_size=4, lr=3e-3, scale_lr=3e-3, progress=False)
    assert result.losses[-1] < 0.7 * result.losses[0]
    x = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        fake = student(x).logits
    assert convert_qat(student) == 14
    llmq.nn.set_backend(student, "torch")
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, fake, rtol=1e-4, atol=1e-4)
    out = save_quantized(student, None, tmp_path / "qat-binary", build_quantization_config(student, recipe))
    weight_cfg = json.loads((out / "config.json").read_text())["quantization_config"]["weight"]
    assert weight_cfg["method"] == "qat" and weight_cfg["levels"] == "binary"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    llmq.nn.set_backend(loaded, "torch")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)


def test_uniform_recipes_keep_the_integer_grid_and_bad_levels_are_refused():
    model = make_tiny_llama()
    prepare_qat(model, WeightRecipe(4, 32, False))
    assert type(model.model.layers[0].mlp.down_proj) is FakeQuantLinear
    with pytest.raises(ValueError, match="for non-uniform levels"):
        FakeLevelsLinear(nn.Linear(8, 2), "uniform", 4, None)
    with pytest.raises(ValueError, match="levels are symmetric"):
        WeightRecipe(1, 32, False, method="qat", levels="binary")
