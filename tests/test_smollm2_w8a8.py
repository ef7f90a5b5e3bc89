"""SmolLM2-135M through the W8A8 pipeline: SmoothQuant + dynamic per-token int8, save, load, evaluate.

The issue's target (within 2% of fp perplexity) on the first 2048 held-out tokens;
few calibration samples to keep CI short (scripts/eval_w8a8.py has the full table).
"""

import pytest
import torch

import llmq
from llmq.eval.perplexity import perplexity
from llmq.model.source import DEFAULT_MODEL, load_model
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.recipes import ActivationRecipe
from llmq.w8a8.quantize import quantize_w8a8

pytestmark = pytest.mark.slow
TOKENS = 2048


def test_w8a8_dynamic_smoothquant_within_2_percent(tmp_path):
    model, tok, _ = load_model(DEFAULT_MODEL)
    fp_ppl = perplexity(model, tok, max_tokens=TOKENS, progress=False).perplexity
    del model
    recipe = ActivationRecipe(scheme="dynamic", smoothquant_alpha=0.5)
    result = quantize_w8a8(DEFAULT_MODEL, recipe, tmp_path / "q", n_samples=4, progress=False)
    assert result.summary.linears == 210
    loaded, tok = llmq.load(result.out_dir)
    assert sum(isinstance(m, W8A8Linear) for m in loaded.modules()) == 210
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, result.model(x).logits)
    ppl = perplexity(loaded, tok, max_tokens=TOKENS, progress=False).perplexity
    print(f"W8A8 dynamic + SmoothQuant: ppl {ppl:.3f} vs fp {fp_ppl:.3f}")
    assert ppl <= fp_ppl * 1.02
    assert ppl != fp_ppl  # the activations really were quantized
