"""``QuantLinear`` with non-uniform levels: the codebook buffer, the torch backend's table lookup, the
CPU backend declining, dtype casts and the state dict."""

import pytest
import torch

from llmq.nn import QuantLinear
from llmq.nn.backends import LinearSpec, dequantize_packed
from llmq.nn.cpu_backend import CpuBackend
from llmq.quant.levels import quantize_weight_levels
from llmq.quant.packing import unpack
from llmq.recipes import LEVEL_BITS

KINDS = [(kind.value, bits) for kind in LEVEL_BITS for bits in LEVEL_BITS[kind]]
SHAPES = [(1, 100, 64), (33, 129, None), (16, 200, 32), (8, 64, 128)]


def _reference(qw) -> torch.Tensor:
    """``codebook[0 or n, code] * scale`` written out element by element from the contract."""
    n, k = qw.codes.shape
    g = k if qw.group_size is None else qw.group_size
    cb = qw.codebook.half().float()
    w = torch.empty(n, k)
    for i in range(n):
        row = cb[0 if cb.shape[0] == 1 else i]
        w[i] = row[qw.codes[i].long()] * qw.scales[i, torch.arange(k) // g].half().float()
    return w


@pytest.mark.parametrize("kind,bits", KINDS, ids=[f"{k}{b}" for k, b in KINDS])
@pytest.mark.parametrize("n,k,group", SHAPES, ids=["N1-K100-g64", "N33-K129-chan", "g32", "g128>K"])
def test_torch_backend_dequantizes_exactly_as_the_contract(kind, bits, n, k, group):
    qw = quantize_weight_levels(torch.randn(n, k), kind, bits, group)
    layer = QuantLinear.from_quantized(qw)
    assert layer.codebook.dtype == torch.float16 and layer.qzeros is None and layer.zeros is None
    assert layer.codebook.shape == (n if kind == "kmeans" else 1, 1 << bits)
    assert torch.equal(unpack(layer.qweight, bits, k).t(), qw.codes)
    ref = _reference(qw)
    assert torch.equal(dequantize_packed(layer).t(), ref)
    assert torch.equal(qw.dequantize(), ref)
    x = torch.randn(1, k)  # M = 1 (decode)
    torch.testing.assert_close(layer(x), x @ ref.t(), rtol=1e-5, atol=1e-5)


def test_cpu_backend_declines_non_uniform_levels_and_the_torch_backend_runs_them():
    spec = LinearSpec(256, 256, 4, 64, True, "cpu", torch.bfloat16, "nf")
    ok, reason = CpuBackend().can_implement(spec)
    assert not ok and "codebook" in reason
    layer = QuantLinear.from_quantized(quantize_weight_levels(torch.randn(256, 256), "nf", 4, 64))
    layer.prepare(torch.bfloat16)
    assert layer.backend_for(torch.empty(0, 256, dtype=torch.bfloat16)).name == "torch"
    with pytest.raises(ValueError, match="codebook"):
        QuantLinear(256, 256, 4, 64, True, backend="cpu", levels="nf")(torch.randn(2, 256, dtype=torch.bfloat16))


def test_bf16_cast_keeps_the_codebook_exact_and_state_dict_round_trips():
    qw = quantize_weight_levels(torch.randn(24, 96), "kmeans", 3, 32)
    layer = QuantLinear.from_quantized(qw, bias=torch.randn(24))
    before = layer.codebook.clone()
    layer.bfloat16()
    assert layer.codebook.dtype == torch.float16 and torch.equal(layer.codebook, before)
    cfg = layer.to_config()
    assert cfg["levels"] == "kmeans" and cfg["symmetric"] is True
    fresh = QuantLinear.from_config(cfg, 96, 24, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(dequantize_packed(fresh), dequantize_packed(layer))
    assert "levels=kmeans" in repr(fresh)
    assert "levels" not in QuantLinear(96, 24, 4, 32, True).to_config()  # uniform configs as before


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1, levels="uniform"), "unsupported weight bits"),
    (dict(bits=2, levels="binary"), "binary levels take bits"),
    (dict(bits=3, levels="nf", symmetric=False), "symmetric=True"),
], ids=["1bit-uniform", "binary-2bit", "asym"])
def test_quant_linear_refuses_what_the_levels_cannot_store(kwargs, match):
    args = {"symmetric": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        QuantLinear(64, 8, args.pop("bits"), 32, args.pop("symmetric"), **args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind,bits", KINDS, ids=[f"{k}{b}" for k, b in KINDS])
@pytest.mark.parametrize("m", [1, 17], ids=lambda m: f"M{m}")
def test_triton_backend_runs_the_lookup_kernels_end_to_end(m, kind, bits, dtype, kernel_tol):
    """A ``QuantLinear`` holding a codebook, forced to ``triton-interpret``: the layer converts its qweight to
    the tiled layout, the backend routes it to ``lut_matmul``, and the output equals the torch backend's
    table lookup (K = 129: not a multiple of the group or the kernel's K block)."""
    k, n = 129, 40
    layer = QuantLinear.from_quantized(quantize_weight_levels(torch.randn(n, k) / k**0.5, kind, bits, 32),
                                       bias=torch.randn(n))
    layer.bias.data = layer.bias.to(dtype)
    x = torch.randn(2, m, k).to(dtype)
    layer.set_backend("torch")
    expected = layer(x)
    layer.set_backend("triton-interpret")
    y = layer(x)
    assert layer.backend_for(x).name == "triton-interpret" and layer.qweight_layout == "tiled"
    assert y.dtype == dtype and y.shape == (2, m, n)
    torch.testing.assert_close(y, expected, **kernel_tol[dtype])
