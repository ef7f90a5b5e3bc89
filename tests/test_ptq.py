"""``llmq.ptq``: prepare → calibrate → convert equals the W8A8 drivers it is built from."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_model_dir
from torch import nn

import llmq.ptq as ptq
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.recipes import ActivationRecipe
from llmq.w8a8 import quantize_model_w8a8, quantize_w8a8

sys.path.insert(0, str(Path(__file__).parent))
from w8a8_tiny import tiny_llama, token_batches  # noqa: E402

RECIPES = {
    "static-kl-sq": ActivationRecipe(scheme="static", observer="kl", smoothquant_alpha=0.9),
    "static-ema-sq": ActivationRecipe(scheme="static", observer="ema", smoothquant_alpha=0.5),
    "static-percentile": ActivationRecipe(scheme="static", observer="percentile", smoothquant_alpha=None),
    "static-minmax-sq": ActivationRecipe(scheme="static", observer="minmax", smoothquant_alpha=0.9),
    "dynamic-sq": ActivationRecipe(scheme="dynamic", smoothquant_alpha=0.5),
}


def w8a8_state(model):
    """Every W8A8Linear's buffers and every float parameter (smoothed norms included), by name."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_model(a, b):
    sa, sb = w8a8_state(a), w8a8_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    kinds = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
    assert kinds(a) == kinds(b)


@pytest.mark.parametrize("name", list(RECIPES), ids=list(RECIPES))
def test_calibrate_equals_quantize_model_w8a8(name):
    recipe, batches = RECIPES[name], token_batches(3)
    ref = tiny_llama()
    quantize_model_w8a8(ref, recipe, batches, progress=False)
    model = ptq.convert(ptq.calibrate(ptq.prepare(tiny_llama(), recipe), batches))
    assert_same_model(model, ref)
    assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 14
    assert not hasattr(model, "_llmq_ptq")


@pytest.mark.parametrize("name", ["static-kl-sq", "static-ema-sq"], ids=["kl", "ema"])
def test_own_forward_loop_with_smooth_equals_calibrate(name):
    recipe, batches = RECIPES[name], token_batches(3)
    ref = ptq.convert(ptq.calibrate(ptq.prepare(tiny_llama(), recipe), batches))
    model = ptq.prepare(tiny_llama(), recipe)
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
        with pytest.raises(ValueError, match="not folded"):
            ptq.convert(model)  # raises before touching anything
        ptq.smooth(model)
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    assert_same_model(ptq.convert(model), ref)


@pytest.mark.parametrize("name", ["static-kl-sq", "static-minmax-sq", "dynamic-sq"])
def test_equals_llmq_quantize_on_a_one_layer_model(tmp_path, name):
    # `llmq quantize --method smoothquant` (quantize_w8a8) calibrates layer by layer; with one decoder
    # layer both see the same float inputs, so the modules must be identical
    from conftest import make_tiny_llama
    from llmq.w8a8.quantize import calibration_batches

    folder = save_model_dir(make_tiny_llama(layers=1), tmp_path / "m")
    recipe = RECIPES[name]
    result = quantize_w8a8(folder, recipe, None, n_samples=3, seq_len=32, batch_size=1, progress=False)
    model = make_tiny_llama(layers=1)
    batches = calibration_batches(result.tokenizer, 3, 32)
    ptq.convert(ptq.calibrate(ptq.prepare(model, recipe), batches))
    assert_same_model(model, result.model)


@pytest.mark.parametrize("observer", ["kl", "ema", "minmax"])
def test_plain_sequential_of_linears(observer):
    # the modules must be what the observers give on the float inputs each Linear saw (window by window)
    from llmq.observers import make_observer

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    data = [torch.randn(4, 16, 64) for _ in range(3)]
    fp = copy.deepcopy(seq)
    recipe = ActivationRecipe(scheme="static", observer=observer, smoothquant_alpha=None)
    ptq.convert(ptq.calibrate(ptq.prepare(seq, recipe), data))
    assert isinstance(seq[0], W8A8Linear) and isinstance(seq[2], W8A8Linear) and seq[0].static
    obs = [make_observer(observer), make_observer(observer)]
    with torch.no_grad():
        for x in data:
            for w in x.split(1):
                obs[0].observe(w)
                obs[1].observe(fp[1](fp[0](w)))
    want = nn.Sequential(W8A8Linear.from_linear(fp[0], obs[0].scale()), nn.ReLU(),
                         W8A8Linear.from_linear(fp[2], obs[1].scale()))
    assert_same_model(seq, want)
    x = torch.randn(2, 16, 64)
    ref, y = fp(x), seq(x)
    assert (10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum())).item() > 10


def test_dynamic_sequential_needs_no_data():
    seq = nn.Sequential(nn.Linear(8, 8))
    ptq.convert(ptq.prepare(seq, ActivationRecipe(scheme="dynamic", smoothquant_alpha=None)))
    assert isinstance(seq[0], W8A8Linear) and not seq[0].static


def test_errors_name_the_fix():
    seq = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="smoothquant_alpha=None"):
        ptq.prepare(seq, ActivationRecipe(scheme="static", observer="kl"))
    with pytest.raises(ValueError, match="not prepared"):
        ptq.convert(seq)
    ptq.prepare(seq, ActivationRecipe(scheme="static", observer="kl", smoothquant_alpha=None))
    with pytest.raises(ValueError, match="already prepared"):
        ptq.prepare(seq, ActivationRecipe(scheme="static", observer="kl", smoothquant_alpha=None))
    with pytest.raises(ValueError, match="never reached"):
        ptq.convert(seq)
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        ptq.prepare(nn.Sequential(nn.ReLU()), ActivationRecipe(scheme="dynamic", smoothquant_alpha=None))
