import pytest
import torch

from llmq.nn import QuantLinear, available_backends, set_backend
from llmq.backend_choice import WEIGHT_MATMUL
from llmq.nn.backends import LinearSpec, choose_backend, dequantize_packed, register_backend
from llmq.quant.primitives import quantize_weight


def _layer(k, n, bits, group, sym, bias=True, backend=None):
    w = torch.randn(n, k)
    qw = quantize_weight(w, bits, group, sym)
    b = torch.randn(n) if bias else None
    return QuantLinear.from_quantized(qw, b, backend=backend), qw, b


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 128, None], ids=["g32", "g128", "chan"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("k", [64, 129, 576], ids=lambda k: f"K{k}")
def test_torch_backend_matches_dequantized_reference(k, bits, group, sym):
    layer, qw, b = _layer(k, 48, bits, group, sym, backend="torch")  # (automatic on CPU is "cpu": bf16 compute)
    # buffers unpack to exactly the codes/scales/zeros that were packed
    assert torch.equal(dequantize_packed(layer), qw.dequantize().t().contiguous())
    x = torch.randn(3, 5, k)
    ref = x @ qw.dequantize().t() + b
    torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_activations(dtype):
    layer, qw, b = _layer(128, 32, 4, 32, False)
    x = torch.randn(4, 128)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), x @ qw.dequantize().t() + b, atol=0.1, rtol=0.02)


def test_buffer_shapes_as_documented():
    # the canonical layout as stored (the cpu backend, automatic on CPU, holds its own layout: test_cpu_backend)
    layer, _, _ = _layer(576, 1536, 4, 128, False, backend="torch")
    assert layer.qweight.shape == (72, 1536) and layer.qweight.dtype == torch.int32
    assert layer.scales.shape == (5, 1536) and layer.scales.dtype == torch.float16
    assert layer.qzeros.shape == (5, 1536) and layer.qzeros.dtype == torch.uint8
    sym, _, _ = _layer(576, 64, 3, None, True, bias=False, backend="torch")
    assert sym.qweight.shape == (58, 64) and sym.scales.shape == (1, 64)
    assert sym.qzeros is None and sym.bias is None
    assert set(dict(sym.named_buffers())) == {"qweight", "scales"}


@pytest.mark.parametrize("k", [129, 576], ids=lambda k: f"K{k}")
def test_float_zero_points_layer(k):
    """HQQ's float zeros: a float16 "zeros" buffer instead of uint8 "qzeros", recorded in the module config,
    rebuilt from it, and dequantized exactly as the QuantizedWeight (torch backend)."""
    from llmq.algorithms import HQQ

    qw = HQQ(torch.randn(48, k), 4, 64, symmetric=False).quantize()
    b = torch.randn(48)
    layer = QuantLinear.from_quantized(qw, b, backend="torch")
    assert layer.qzeros is None and layer.zeros.dtype == torch.float16 and layer.zeros.shape == (qw.zeros.shape[1], 48)
    assert set(layer.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    assert layer.to_config()["zero_point"] == "float" and "zero_point=float" in repr(layer)
    assert torch.equal(dequantize_packed(layer), qw.dequantize().t().contiguous())
    x = torch.randn(3, k)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t() + b, atol=1e-4, rtol=1e-4)
    rebuilt = QuantLinear.from_config(layer.to_config(), k, 48, bias=True)
    rebuilt.set_backend("torch")
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt(x), layer(x))
    int_cfg = _layer(k, 48, 4, 64, False)[0].to_config()
    assert "zero_point" not in int_cfg  # integer zeros: the config as before float zeros existed


def test_dtype_casts_never_round_scales_or_float_zeros():
    """.bfloat16() would round fp16 scales and an 8-bit group's float zero (up to half a step): they stay
    float16; the bias follows the model. Casts to fp32 and back are exact and apply."""
    from llmq.algorithms import HQQ

    layer = QuantLinear.from_quantized(HQQ(torch.randn(32, 128), 8, None, symmetric=False).quantize(), torch.randn(32))
    scales, zeros = layer.scales.clone(), layer.zeros.clone()
    assert not torch.equal(zeros.bfloat16().half(), zeros)  # the rounding this guards against
    layer.bfloat16()
    assert layer.bias.dtype == torch.bfloat16
    assert layer.scales.dtype == layer.zeros.dtype == torch.float16
    assert torch.equal(layer.scales, scales) and torch.equal(layer.zeros, zeros)
    layer.float()
    assert layer.scales.dtype == layer.zeros.dtype == torch.float32
    layer.half()
    assert torch.equal(layer.scales, scales) and torch.equal(layer.zeros, zeros)


def test_config_round_trip_builds_same_module():
    layer, _, _ = _layer(96, 40, 3, 32, True)
    empty = QuantLinear.from_config(layer.to_config(), 96, 40, bias=True)
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(2, 96)
    assert torch.equal(empty(x), layer(x))


def test_wrong_input_width():
    layer, _, _ = _layer(64, 8, 4, 32, False)
    with pytest.raises(ValueError, match="last dim 64"):
        layer(torch.randn(2, 65))


def test_forced_unknown_backend_lists_available():
    layer, _, _ = _layer(64, 8, 4, 32, False)
    layer.set_backend("nope")
    with pytest.raises(ValueError, match=r"unknown backend 'nope': available backends are"):
        layer(torch.randn(1, 64))


def test_forced_backend_that_cannot_run_raises_with_reason():
    class NeverBackend:
        name = "never"

        def can_implement(self, spec):
            return False, "never runs anything"

    register_backend(NeverBackend())  # a name outside the preference order goes first
    try:
        spec = LinearSpec(64, 8, 4, 32, False, "cpu", torch.float32)
        with pytest.raises(ValueError, match="forced backend 'never' cannot run .* never runs anything"):
            choose_backend(spec, forced="never")
        # automatic choice skips it and takes a backend that can run the layer
        assert choose_backend(spec).name != "never"
    finally:
        WEIGHT_MATMUL.unregister("never")
    assert "never" not in available_backends()


def test_env_var_forces_backend(monkeypatch):
    layer, _, _ = _layer(64, 8, 4, 32, False)
    monkeypatch.setenv("LLMQ_BACKEND", "torch")
    layer(torch.randn(1, 64))
    assert layer._backend[("cpu", torch.float32)].name == "torch"
    assert "torch" in available_backends()


def test_set_backend_on_model():
    model = torch.nn.Sequential(_layer(64, 8, 4, 32, False)[0])
    set_backend(model, "torch")
    assert model[0].backend_name == "torch"
