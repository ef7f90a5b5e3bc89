import pytest
import torch
from layer_problems import layer_problem, output_error

from llmq.algorithms import AWQ
from llmq.quant.primitives import quantize_weight


@pytest.fixture
def problem():
    return layer_problem(96, 200)


SETTINGS = [(3, 64), (4, 64), (4, 128), (4, None)]
IDS = [f"int{b}-g{g or 'ch'}" for b, g in SETTINGS]


@pytest.mark.parametrize("bits,group", SETTINGS, ids=IDS)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "no-clip"])
def test_scaled_output_error_below_rtn(problem, bits, group, clip):
    """Folded scales (X / s, W · s) + clipping: lower output error than RTN on the same inputs."""
    w, x = problem
    w2 = w[:40].clone() * 2  # a second Linear reading the same input (like k_proj beside q_proj)
    awq = AWQ([w, w2], bits, group, symmetric=False, clip=clip)
    for chunk in x.split(300):
        awq.add_batch(chunk)
    s = awq.search_scales()
    assert s.shape == (200,) and (s > 0).all()
    qws = awq.quantize(s)
    for orig, qw in zip([w, w2], qws):
        rtn = quantize_weight(orig, bits, group, symmetric=False)
        assert output_error(orig, x, qw.dequantize(), x / s) < output_error(orig, x, rtn.dequantize())


def test_alpha_zero_is_rtn(problem):
    """Without scaling and clipping AWQ is exactly RTN."""
    w, x = problem
    awq = AWQ([w], 4, 64, symmetric=False, clip=False)
    awq.add_batch(x)
    assert torch.equal(awq.quantize(None)[0].codes, quantize_weight(w, 4, 64, False).codes)


def test_search_picks_activation_aware_scales(problem):
    """The large input channels (0-3) get the largest scales."""
    w, x = problem
    awq = AWQ([w], 3, 64, symmetric=False)
    awq.add_batch(x)
    s = awq.search_scales()
    assert s[:4].min() > s[4:].max()


def test_rejects_bad_input(problem):
    w, _ = problem
    with pytest.raises(ValueError, match="add_batch"):
        AWQ([w], 4, 64, False).search_scales()
    with pytest.raises(ValueError, match="must all be"):
        AWQ([w, w[:, :100]], 4, 64, False, names=["q", "k"])
