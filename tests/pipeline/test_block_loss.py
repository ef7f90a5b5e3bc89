"""AWQ's block-output loss: recorded inputs, restored weights, and a search that minimises it."""

import pytest
import torch
from conftest import make_tiny_llama

from llmq.algorithms import AWQ
from llmq.pipeline import quantize_model
from llmq.pipeline.block_loss import BlockOutputLoss
from llmq.recipes import WeightRecipe


@pytest.fixture
def attention_problem():
    """Layer 0 of a tiny Llama with outlier input channels, its q/k/v, a block loss and AWQ fed alike."""
    model = make_tiny_llama()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight[:4] *= 12  # a few large activation channels, as in real models
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    loss = BlockOutputLoss(layer.self_attn, linears, max_windows=3, name="layer0.self_attn")
    awq = AWQ([lin.weight.data for lin in linears], 3, 32, symmetric=False)
    handles = [layer.self_attn.register_forward_pre_hook(loss.record, with_kwargs=True),
               layer.self_attn.q_proj.register_forward_pre_hook(lambda m, args: awq.add_batch(args[0]))]
    ids = torch.randint(0, 320, (6, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for batch in ids.split(2):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    loss.finish_recording()
    return linears, loss, awq


def test_records_whole_batches_up_to_max_windows(attention_problem):
    _, loss, _ = attention_problem
    assert len(loss.calls) == 2 and loss.windows == 4  # batches of 2 windows until >= 3 are held


def test_float_weights_give_zero_and_weights_are_restored(attention_problem):
    linears, loss, _ = attention_problem
    before = [lin.weight.detach().clone() for lin in linears]
    assert loss([w.clone() for w in before]) == 0.0
    noisy = [w + 0.01 * torch.randn_like(w) for w in before]
    assert loss(noisy) > 0.0
    assert all(torch.equal(lin.weight, w) for lin, w in zip(linears, before))


def test_block_search_minimises_the_block_output_error(attention_problem):
    """The scale chosen on the attention output is at least as good there as RTN's and the linear loss's."""
    _, loss, awq = attention_problem
    s_block = awq.search_scales(loss)
    s_linear = awq.search_scales()
    best = loss(awq.candidates(s_block))
    assert best <= loss(awq.candidates(s_linear))
    assert best < loss(awq.candidates(torch.ones_like(s_block)))  # strictly better than plain RTN here


def test_wrong_number_of_candidates_and_no_recording():
    model = make_tiny_llama()
    attn = model.model.layers[0].self_attn
    loss = BlockOutputLoss(attn, [attn.q_proj, attn.k_proj], max_windows=1)
    with pytest.raises(ValueError, match="no block inputs"):
        loss.finish_recording()
    with pytest.raises(ValueError, match="2 Linears"):
        loss([attn.q_proj.weight])
    with pytest.raises(ValueError, match="at least one calibration window"):
        BlockOutputLoss(attn, [attn.q_proj], max_windows=0)


@pytest.mark.parametrize("args,match", [({"scale_loss": "mse"}, "scale_loss"), ({"block_windows": 0}, "block_windows")])
def test_bad_awq_loss_arguments(args, match):
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        quantize_model(make_tiny_llama(), WeightRecipe(4, 32, False, method="awq", method_args=args), ids,
                       progress=False)


@pytest.mark.parametrize("scale_loss,expect_calls", [("block", True), ("linear", False)])
def test_pipeline_uses_the_chosen_loss(monkeypatch, scale_loss, expect_calls):
    calls = []
    original = BlockOutputLoss.__call__
    monkeypatch.setattr(BlockOutputLoss, "__call__", lambda self, c: calls.append(self.name) or original(self, c))
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    recipe = WeightRecipe(4, 32, False, method="awq", method_args={"scale_loss": scale_loss})
    quantize_model(make_tiny_llama(), recipe, ids, batch_size=2, progress=False)
    assert bool(calls) == expect_calls
    if expect_calls:  # the attention for q/k/v and the MLP for gate/up, in both layers
        assert {n.rsplit(".", 1)[-1] for n in calls} == {"self_attn", "mlp"}
        assert {n.split(".")[2] for n in calls} == {"0", "1"}


def test_memory_plan_counts_the_recorded_block_inputs():
    from llmq.pipeline.layerwise import _block_loss_mb

    ids = torch.zeros(40, 512, dtype=torch.long)
    block = WeightRecipe(4, 128, False, method="awq")
    assert _block_loss_mb(block, ids, 1000, batch_size=8) == 2 * 16 * 512 * 1000 * 4 / 1e6  # 16 windows, in + out
    assert _block_loss_mb(block, ids, 1000, batch_size=6) == 2 * 18 * 512 * 1000 * 4 / 1e6  # whole batches
    linear = WeightRecipe(4, 128, False, method="awq", method_args={"scale_loss": "linear"})
    assert _block_loss_mb(linear, ids, 1000, 8) == 0.0 == _block_loss_mb(WeightRecipe(4, 128, False, method="gptq"),
                                                                      ids, 1000, 8)
