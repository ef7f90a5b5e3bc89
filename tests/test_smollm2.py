"""The real model: SmolLM2-135M (embedded default) quantized, saved, loaded and evaluated.

Perplexity here uses the first 2048 tokens of the held-out BBC text to keep CI
short; the README table (scripts/eval_rtn.py) uses the full 16,384-token protocol.
"""

import pytest
import torch

import llmq
from llmq.eval.perplexity import perplexity
from llmq.model.source import DEFAULT_MODEL, load_model
from llmq.recipes import WeightRecipe

pytestmark = pytest.mark.slow
TOKENS = 2048


@pytest.fixture(scope="module")
def fp_ppl():
    model, tok, _ = load_model(DEFAULT_MODEL)
    return perplexity(model, tok, max_tokens=TOKENS, progress=False).perplexity


@pytest.mark.parametrize(
    "recipe, max_increase",
    [
        (WeightRecipe(8, None, True), 0.01),  # issue target: int8 within 1% of fp
        (WeightRecipe(4, 64, False), 0.60),
        (WeightRecipe(4, 128, False), 0.90),  # 576 = 4.5 x 128: padded last group
    ],
    ids=["int8-channel", "int4-g64", "int4-g128-padded"],
)
def test_quantize_load_eval(tmp_path, fp_ppl, recipe, max_increase):
    result = llmq.quantize(DEFAULT_MODEL, recipe, tmp_path / "q", progress=False)
    assert result.summary.linears == 210
    model, tok = llmq.load(result.out_dir)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(x).logits, result.model(x).logits)
    ppl = perplexity(model, tok, max_tokens=TOKENS, progress=False).perplexity
    print(f"{recipe.bits}-bit group {recipe.group_size}: ppl {ppl:.3f} vs fp {fp_ppl:.3f}")
    assert fp_ppl <= ppl * 1.002  # quantization does not help (sanity: the model really changed or not)
    assert ppl <= fp_ppl * (1 + max_increase)
