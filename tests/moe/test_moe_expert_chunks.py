"""GPTQ / AWQ on experts in subsets (``expert_chunk``): the same codes as one pass, fewer statistics held at once."""

import sys
from pathlib import Path

import pytest
import torch

from llmq.moe.calibrated import ExpertsCalibrator
from llmq.pipeline import quantize_layerwise
from llmq.pipeline.experts import experts_statistics_mb
from llmq.pipeline.methods import method_args
from llmq.recipes import WeightMethod, WeightRecipe

sys.path.insert(0, str(Path(__file__).parents[1]))
from moe_tiny import tiny_moe  # noqa: E402

FAST = {WeightMethod.GPTQ: {"clip_search": False}, WeightMethod.AWQ: {"n_grid": 10, "clip_grid": 10}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = tiny_moe("qwen3_moe")  # 4 experts per block, 2 layers
    path = tmp_path_factory.mktemp("qwen3_moe") / "src"
    model.save_pretrained(path)
    return path


def _experts_state(q) -> dict[str, torch.Tensor]:
    return {k: v for k, v in q.model.state_dict().items() if ".experts." in k}


@pytest.mark.parametrize("method", [WeightMethod.GPTQ, WeightMethod.AWQ], ids=["gptq", "awq"])
@pytest.mark.parametrize("chunk", [1, 3], ids=["chunk1", "chunk3"])
def test_subsets_give_the_codes_of_one_pass(folder, method, chunk, monkeypatch):
    """chunk 3 of 4 experts leaves a subset of one; min_tokens makes some experts take the pooled fallback,
    whose statistics must still see every expert's tokens."""
    torch.manual_seed(0)
    calib = torch.randint(0, 128, (6, 16))
    args = {**FAST[method], "expert_min_tokens": 40, "expert_fallback": "pooled"}
    recipe = dict(bits=4, group_size=32, include=("*experts*",), method=method)
    one, s1 = quantize_layerwise(folder, WeightRecipe(**recipe, method_args=args), calib, device="cpu",
                                 progress=False)

    held = []
    add_batch = ExpertsCalibrator.add_batch

    def spy(self, stage, x, top_k_index):
        held.append(len(self._algos[stage]))
        return add_batch(self, stage, x, top_k_index)

    monkeypatch.setattr(ExpertsCalibrator, "add_batch", spy)
    sub, s2 = quantize_layerwise(folder, WeightRecipe(**recipe, method_args={**args, "expert_chunk": chunk}), calib,
                                 device="cpu", progress=False)
    assert max(held) == chunk  # never more than one subset's statistics
    assert s1.expert_fallbacks == s2.expert_fallbacks
    assert any(r["experts"] for r in s1.expert_fallbacks.values()), "the test wants some pooled fallbacks"
    a, b = _experts_state(one), _experts_state(sub)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_memory_plan_counts_one_subset(folder):
    from llmq.pipeline.lazy import empty_model

    layer = empty_model(folder).model.layers[0]
    full = experts_statistics_mb(layer, WeightRecipe(bits=4, method=WeightMethod.GPTQ),
                                 method_args(WeightRecipe(bits=4, method=WeightMethod.GPTQ)))
    r1 = WeightRecipe(bits=4, method=WeightMethod.GPTQ, method_args={"expert_chunk": 1})
    assert experts_statistics_mb(layer, r1, method_args(r1)) == pytest.approx(full * 2 / 5)  # (1 + pooled) / (4 + 1)


def test_negative_chunk_is_refused(folder):
    with pytest.raises(ValueError, match="expert_chunk must be an integer >= 0"):
        quantize_layerwise(folder, WeightRecipe(bits=4, method=WeightMethod.GPTQ, method_args={"expert_chunk": -1}),
                           torch.randint(0, 128, (2, 8)), device="cpu", progress=False)
