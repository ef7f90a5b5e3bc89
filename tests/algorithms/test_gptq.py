import pytest
import torch
from layer_problems import layer_problem, output_error

from llmq.algorithms import GPTQ
from llmq.nn.quant_linear import QuantLinear
from llmq.quant.primitives import qmax, quantize_weight, quantize_with_params


@pytest.fixture
def problem():
    return layer_problem(96, 200)


SETTINGS = [(2, 64), (3, 64), (4, 32), (4, 128), (4, None), (8, None)]
IDS = [f"int{b}-g{g or 'ch'}" for b, g in SETTINGS]


def run_gptq(w, x, bits, group, **kw):
    gptq = GPTQ(w, bits, group, symmetric=False, **kw)
    for chunk in x.split(256):  # several batches: the running-mean Hessian must not depend on batching
        gptq.add_batch(chunk)
    return gptq.quantize()


@pytest.mark.parametrize("bits,group", SETTINGS, ids=IDS)
@pytest.mark.parametrize("act_order", [True, False], ids=["act-order", "in-order"])
def test_output_error_below_rtn(problem, bits, group, act_order):
    w, x = problem  # K = 200: the last group of 64/128 is short (padded)
    rtn = quantize_weight(w, bits, group, symmetric=False)
    qw = run_gptq(w, x, bits, group, act_order=act_order)
    assert output_error(w, x, qw.dequantize()) < output_error(w, x, rtn.dequantize())


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_act_order_codes_are_canonical(problem, symmetric):
    """Static groups: column k uses group k // g, so codes + scales form a plain QuantizedWeight."""
    w, x = problem
    gptq = GPTQ(w, 4, 64, symmetric=symmetric)
    gptq.add_batch(x)
    qw = gptq.quantize()
    assert qw.codes.shape == w.shape and qw.codes.dtype == torch.uint8
    assert int(qw.codes.max()) <= qmax(4) and qw.scales.shape == (96, 4)
    assert torch.equal(qw.scales, qw.scales.half().float())  # storable as fp16 exactly
    # re-quantizing the dequantized weight with the canonical group parameters gives the same codes
    assert torch.equal(quantize_with_params(qw.dequantize(), qw.scales, qw.zeros, 4, 64), qw.codes)
    # and QuantLinear runs it as is (the fp32 reference backend: exact to fp32 rounding)
    layer = QuantLinear.from_quantized(qw, backend="torch")
    xs = x[:5]
    torch.testing.assert_close(layer(xs), xs @ qw.dequantize().T, atol=1e-4, rtol=1e-4)


def test_act_order_changes_the_result(problem):
    w, x = problem
    a = run_gptq(w, x, 3, 64, act_order=True)
    b = run_gptq(w, x, 3, 64, act_order=False)
    assert not torch.equal(a.codes, b.codes)


def test_dead_inputs_are_handled():
    w, x = layer_problem(32, 64)
    x[:, 5] = 0  # an input that is never active: H[5, 5] == 0
    qw = run_gptq(w, x, 4, 32)
    assert torch.isfinite(qw.dequantize()).all()


def test_needs_calibration_data(problem):
    w, _ = problem
    with pytest.raises(ValueError, match="add_batch"):
        GPTQ(w, 4, 64, False, name="model.layers.0.mlp.up_proj").quantize()


def test_rejects_bad_arguments(problem):
    w, _ = problem
    with pytest.raises(ValueError, match="percdamp"):
        GPTQ(w, 4, 64, False, percdamp=0)
    w = w.clone()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="o_proj"):
        GPTQ(w, 4, 64, False, name="o_proj")
