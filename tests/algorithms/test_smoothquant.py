"""SmoothQuant: factors, folding exactness on a float model, and what smoothing buys after quantization."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llmq.algorithms.smoothquant import smooth_llama_layers, smoothing_factors
from llmq.arch import NormKind, Producer, Subgroup, fold
from llmq.arch.folding import expand_heads, reduce_heads
from llmq.model.swap import find_linears
from llmq.w8a8.quantize import collect_input_absmax, w8a8_weight_recipe

sys.path.insert(0, str(Path(__file__).parents[1]))
from w8a8_tiny import tiny_llama, token_batches  # noqa: E402


def test_factors_formula_and_degenerate_channels():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([[1.0, 4.0, 2.0, 0.0], [-0.5, 1.0, 1.0, 0.0]])
    s = smoothing_factors(act, [w], alpha=0.5)
    assert s[0] == pytest.approx(2.0) and s[1] == pytest.approx(0.5)
    assert s[2] == 1.0 and s[3] == 1.0  # zero activation / zero weight column: leave alone
    assert torch.equal(smoothing_factors(act, [w], alpha=0.0)[:2], 1 / torch.tensor([1.0, 4.0]))


def test_alpha_out_of_range():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smoothing_factors(torch.ones(3), [torch.ones(2, 3)], 1.5)


def test_fold_into_layernorm_exact():
    ln, lin = nn.LayerNorm(16).double(), nn.Linear(16, 8).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    ref = lin(ln(x))
    s = torch.rand(16, dtype=torch.float64) * 4 + 0.1
    fold(nn.ModuleDict({"ln": ln, "lin": lin}), Subgroup(("lin",), Producer("ln", NormKind.W)), s, "m")
    torch.testing.assert_close(lin(ln(x)), ref, rtol=1e-12, atol=1e-12)


def test_fold_into_linear_through_gated_activation_exact():
    gate, up, down = nn.Linear(8, 12).double(), nn.Linear(8, 12).double(), nn.Linear(12, 8).double()
    x = torch.randn(3, 8, dtype=torch.float64)

    def mlp():
        return down(nn.functional.silu(gate(x)) * up(x))

    ref = mlp()
    fold(nn.ModuleDict({"up": up, "down": down}), Subgroup(("down",), Producer("up")),
         torch.rand(12, dtype=torch.float64) + 0.2, "mlp")
    torch.testing.assert_close(mlp(), ref, rtol=1e-12, atol=1e-12)


def test_kv_expand_reduce():
    s = torch.arange(6.0)  # 2 kv heads x head_dim 3
    e = expand_heads(s, groups=2, head_dim=3)
    assert e.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert torch.equal(reduce_heads(e, 2, 3), s)


@pytest.mark.parametrize("alpha", [0.5, 0.85], ids=["a0.5", "a0.85"])
def test_folding_leaves_float_model_outputs_unchanged(alpha):
    # float64 so the check is about the algebra (incl. GQA v->o and up->down), not rounding
    model = tiny_llama().double()
    ids = token_batches(3)
    ref = [model(input_ids=b).logits for b in ids]
    names = [n for n, _ in find_linears(model, w8a8_weight_recipe())]
    stats = collect_input_absmax(model, names, ids, progress=False)
    smoothed = smooth_llama_layers(model, stats, alpha)
    assert len(smoothed) == 2 * 7
    for b, r in zip(ids, ref):
        torch.testing.assert_close(model(input_ids=b).logits, r, rtol=1e-9, atol=1e-9)


def test_smoothing_flattens_activation_outliers():
    model = tiny_llama()
    ids = token_batches(2)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    before = collect_input_absmax(model, names, ids, progress=False)
    smooth_llama_layers(copy_model := copy.deepcopy(model), before, 0.5)
    after = collect_input_absmax(copy_model, names, ids, progress=False)
    key = "model.layers.0.self_attn.q_proj"

    def spread(a):  # max / median channel: what per-tensor/per-token int8 suffers from
        return (a.max() / a.median()).item()

    assert spread(after[key]) < spread(before[key]) / 3


def test_non_llama_model_rejected():
    with pytest.raises(ValueError, match="no model.layers"):
        smooth_llama_layers(nn.Sequential(nn.Linear(2, 2)), {}, 0.5)
