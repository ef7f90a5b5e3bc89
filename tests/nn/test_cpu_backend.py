"""The ``cpu`` backend (torch's int4 / int8 CPU kernels) against the torch reference.

Every accepted case is checked against the exact (float64) product with llmq's dequantized weight,
within the error bound ``llmq.nn.cpu_backend`` documents; declined cases name their reason.
"""

import shutil

import pytest
import torch

from llmq.nn import QuantLinear, available_backends, choose_backend
from llmq.nn.backends import LinearSpec, dequantize_packed
from llmq.nn.cpu_backend import kernel_group, uses_int8_kernel
from llmq.nn.cpu_layout import from_cpu, from_cpu_split, int4_order, padded_k, to_cpu, to_cpu_split
from llmq.quant.packing import pack
from llmq.quant.primitives import quantize_weight

U_BF16 = 2.0 ** -8  # bf16 unit roundoff
# (M, K): M = 1 (decode) and tile edges; K off the group (129, 127), SmolLM2's 576 (g128: 4.5 groups)
SHAPES = [(1, 576), (127, 129), (128, 128), (129, 127), (3, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (bits, group): every width; groups the kernel has, longer than it (256 at K = 576 -> 64) and per channel
SCHEMES = [(4, 32), (4, 64), (4, 128), (4, 256), (4, None), (3, 64), (3, None), (2, 32), (2, 128), (8, None),
           (8, 32), (8, 128)]


def _layer(k, n, bits, group, sym, float_zeros=False, bias=True):
    w = torch.randn(n, k)
    if float_zeros:
        from llmq.algorithms import HQQ
        qw = HQQ(w, bits, group, symmetric=False).quantize()
    else:
        qw = quantize_weight(w, bits, group, sym)
    b = torch.randn(n) if bias else None
    return QuantLinear.from_quantized(qw, b), qw, b


def error_bound(layer, x: torch.Tensor) -> torch.Tensor:
    """The documented bound on ``|y - (x @ W.T + b)|`` per output element, float64."""
    k, bits = layer.in_features, layer.bits
    w = dequantize_packed(layer).double()  # [K, N]
    g = layer.effective_group_size
    s = layer.scales.double().repeat_interleave(g, 0)[:k]  # [K, N]
    mid = float(1 << (bits - 1))
    zero = layer.zero_points.double().repeat_interleave(g, 0)[:k] if layer.zero_points is not None else mid
    code = w / s + zero
    e = s * (code - mid).abs() + (s * (mid - zero)).abs()  # scale / zero rounding to bf16, per weight
    if bits == 8 and layer.group_size is not None:  # split 8-bit: two partial outputs rounded separately
        e = e + 16 * s
    ax = x.double().abs().reshape(-1, k)
    x_rounding = 0.0 if x.dtype == torch.bfloat16 else 1.0
    y = x.double().reshape(-1, k) @ w
    b = layer.bias.double() if layer.bias is not None else torch.zeros(layer.out_features, dtype=torch.float64)
    # 2x e: the int8 kernel's bf16 output is rounded before the fp32 zero correction; fp32 accumulation
    bound = U_BF16 * (2 * ax @ e + x_rounding * ax @ w.abs() + 2 * (y.abs() + b.abs()))
    return bound + k * 2.0 ** -23 * (ax @ w.abs())


def _check(layer, qw, b, m, k, dtype):
    x = torch.randn(m, k).to(dtype)
    assert layer.backend_for(x).name == "cpu"
    y = layer(x)
    assert y.dtype == dtype and y.shape == (m, layer.out_features)
    exact = x.double() @ qw.dequantize().double().t() + (b.double() if b is not None else 0)
    err = (y.double() - exact).abs()
    bound = error_bound(layer, x)
    assert (err <= bound).all(), f"max error {err.max():.3g}, excess {(err - bound).max():.3g}"
    return err, bound


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m,k", SHAPES, ids=[f"M{m}-K{k}" for m, k in SHAPES])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group", SCHEMES, ids=[f"int{b}-g{g or 'chan'}" for b, g in SCHEMES])
def test_matches_reference_within_documented_bound(bits, group, sym, m, k, dtype):
    layer, qw, b = _layer(k, 48, bits, group, sym)
    assert layer.qweight_layout == ("cpu-split" if bits == 8 and group else "cpu")  # converted once, when built
    _check(layer, qw, b, m, k, dtype)


@pytest.mark.parametrize("k", [129, 576], ids=lambda k: f"K{k}")
def test_float_zero_points(k):
    layer, qw, b = _layer(k, 64, 4, 64, False, float_zeros=True)
    assert layer.zeros is not None
    _check(layer, qw, b, 5, k, torch.float32)


def test_bound_is_not_vacuous():
    """The measured error reaches a visible fraction of the bound. The bound is worst case (K rounding
    errors of one sign); random ones add up like sqrt(K), so at K = 576 the largest ratio is ~0.07."""
    layer, qw, b = _layer(576, 256, 4, 128, False)
    err, bound = _check(layer, qw, b, 64, 576, torch.float32)
    assert (err / bound).max() > 0.03


def test_wrong_zero_convention_would_fail_the_bound():
    """Swapping the kernel's zero term sign (a plausible mapping bug) breaks the bound by far."""
    layer, qw, b = _layer(128, 64, 4, 32, False)
    x = torch.randn(4, 128)
    params = layer.__dict__  # run once to build the kernel-side scale/zeros, then corrupt them
    layer(x)
    key, (sz,) = params["_cpu_kernel_params"]
    params["_cpu_kernel_params"] = (key, (torch.stack([sz[..., 0], -sz[..., 1]], -1).contiguous(),))
    exact = x.double() @ qw.dequantize().double().t() + b.double()
    assert ((layer(x).double() - exact).abs() > error_bound(layer, x)).any()


@pytest.mark.parametrize("n", [16, 48, 64, 80, 576], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("k", [32, 64, 127, 129, 576], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_layout_round_trip_is_bit_exact(bits, k, n):
    codes = torch.randint(0, 1 << bits, (k, n), dtype=torch.uint8)
    canonical = pack(codes, bits)
    held = to_cpu(canonical, bits, k)
    assert held.shape == ((n, padded_k(k, True)) if bits == 8 else (n, padded_k(k, False) // 2))
    assert torch.equal(from_cpu(held, bits, k), canonical)
    if bits == 8:
        split = to_cpu_split(canonical, bits, k)
        assert split.shape == (2 * n, padded_k(k, False) // 2) and split.dtype == torch.uint8
        assert torch.equal(from_cpu_split(split, bits, k), canonical)


def test_int4_order_is_a_permutation():
    order = int4_order(80, 96)
    assert torch.equal(order.sort().values, torch.arange(80 * 96))


def test_state_dict_is_canonical_and_load_converts_again():
    layer, qw, b = _layer(576, 64, 4, 128, False)
    reference = QuantLinear.from_quantized(qw, b, backend="torch")
    assert layer.qweight_layout == "cpu" and layer.qweight.dtype == torch.uint8
    assert torch.equal(layer.state_dict()["qweight"], reference.qweight)
    x = torch.randn(2, 576)
    y = layer(x)
    fresh = QuantLinear.from_config(layer.to_config(), 576, 64, bias=True)
    fresh.load_state_dict(reference.state_dict())
    assert torch.equal(fresh(x), y) and fresh.qweight_layout == "cpu"
    layer.set_backend("torch")
    torch.testing.assert_close(layer(x), reference(x), atol=0, rtol=0)
    assert layer.qweight_layout == "canonical"


def test_in_place_scale_edit_rebuilds_kernel_params():
    layer, qw, b = _layer(128, 32, 4, 32, True, bias=False)
    x = torch.randn(2, 128)
    y = layer(x)
    layer.scales.mul_(2)  # exact in fp16 for these magnitudes
    torch.testing.assert_close(layer(x), 2 * y, atol=0, rtol=0)


@pytest.mark.parametrize("bits,group,layout", [(4, 128, "cpu"), (2, 64, "cpu"), (8, None, "cpu"), (8, 64, "cpu-split")])
def test_layout_read_per_scheme(bits, group, layout):
    layer, _, _ = _layer(64, 32, bits, group, True)
    assert layer.qweight_layout == layout


def test_chosen_automatically_on_cpu_and_ordered_between_triton_and_torch():
    names = available_backends()
    assert names.index("triton") < names.index("cpu") < names.index("torch")
    spec = LinearSpec(576, 1536, 4, 128, False, "cpu", torch.float32)
    assert choose_backend(spec).name == "cpu"


@pytest.mark.parametrize("spec,reason", [
    (LinearSpec(128, 40, 4, 32, True, "cpu", torch.float32), "out_features 40 is not a multiple of 16"),
    (LinearSpec(128, 64, 4, 32, True, "cpu", torch.float64), "activations must be"),
    (LinearSpec(128, 64, 4, 32, True, "cuda", torch.float16), "runs on CPU tensors only"),
], ids=["N40", "fp64", "cuda"])
def test_declined_cases_give_the_reason(spec, reason):
    with pytest.raises(ValueError, match=f"forced backend 'cpu' cannot run .*{reason}"):
        choose_backend(spec, forced="cpu")
    if spec.device_type == "cpu":
        assert choose_backend(spec).name == "torch"  # automatic choice: the reference runs instead


def test_declined_layer_runs_the_torch_backend():
    layer, qw, b = _layer(128, 40, 4, 32, True)
    x = torch.randn(3, 128)
    assert layer.backend_for(x).name == "torch" and layer.qweight_layout == "canonical"
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t() + b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,group,d", [(576, 128, 64), (576, 256, 64), (512, 256, 256), (129, None, 32),
                                       (4096, None, 256), (96, 64, 32)])
def test_kernel_group_divides_group_and_padded_k(k, group, d):
    assert kernel_group(k, group) == d


def test_leading_dims_and_no_bias():
    layer, qw, _ = _layer(64, 32, 4, 32, False, bias=False)
    x = torch.randn(2, 3, 64)
    y = layer(x)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, layer(x.reshape(6, 64)).reshape(2, 3, 32), atol=0, rtol=0)


def test_first_call_inside_torch_compile():
    """Built layers hold the cpu layout already; a full-graph compile's first call matches eager."""
    layer, _, _ = _layer(128, 64, 4, 32, False)
    model = torch.nn.Sequential(layer, torch.nn.SiLU())
    x = torch.randn(3, 128)
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, model(x), atol=0, rtol=0)


_CXX = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                          reason="inductor on the CPU compiles C++: no C++ compiler on this machine")


@_CXX
@pytest.mark.parametrize("bits, group", [(4, 64), (3, 32), (8, None), (8, 32)], ids=["int4", "int3", "int8", "int8-g32"])
def test_inductor_compiles_the_kernels(bits, group):
    """Inductor lowers torch's int4 kernel only on scales built outside the graph: a compiled decode step
    (M = 1) runs the cpu backend (the scales were computed in the graph before, and inductor's lowering
    failed with an AssertionError on them). The kernels' outputs match eager bit for bit; the int8
    kernel's fp32 zero correction (asymmetric, ``rowsum(x)·(128 − zero)·s``) is fused by inductor and may
    round differently, so every case is also held to the documented error bound."""
    torch.manual_seed(0)
    layer, qw, b = _layer(128, 64, bits, group, False)
    x = torch.randn(1, 1, 128)
    assert layer.backend_for(x).name == "cpu"
    torch._dynamo.reset()
    y = torch.compile(layer, backend="inductor", fullgraph=True)(x)
    exact = x.double() @ qw.dequantize().double().t() + b.double()
    assert ((y.double() - exact).abs().reshape(1, -1) <= error_bound(layer, x)).all()
    if not uses_int8_kernel(bits, group):
        torch.testing.assert_close(y, layer(x), atol=0, rtol=0)


def test_compiled_forward_follows_prepare_after_an_in_place_edit():
    """Inside a graph the kernel scales built eagerly are used; ``llmq.nn.prepare`` rebuilds them after
    an in-place edit of the scales, and the compiled forward then follows the edit."""
    from llmq.nn import prepare

    layer, _, _ = _layer(128, 64, 4, 32, False)
    x = torch.randn(2, 128)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    before = compiled(x)
    with torch.no_grad():
        layer.scales.mul_(2)
    prepare(layer)
    after = compiled(x)
    torch.testing.assert_close(after, layer(x), atol=0, rtol=0)
    assert not torch.equal(after, before)


def test_compile_without_built_kernel_scales_names_the_fix():
    layer, _, _ = _layer(128, 64, 4, 32, False)
    del layer.__dict__["_cpu_kernel_params"]  # built at construction (prepare); dropped to show the message
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"llmq\.nn\.prepare\(model\) before compiling"):
        torch.compile(layer, backend="aot_eager", fullgraph=True)(torch.randn(2, 128))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_storage_bytes_count_the_checkpoint_layout_not_the_backends(bits):
    """The summary's bits per weight come from ``storage_bytes``: int3 held in the cpu backend's 4-bit
    containers must still count as the 3.2-bit packing a checkpoint saves (it read 4.375 for int3 g64)."""
    torch.manual_seed(0)
    k, n = 160, 64
    ql = QuantLinear.from_quantized(quantize_weight(torch.randn(n, k), bits, 32, False))
    canonical = ql.storage_bytes()
    groups = k // 32
    expected = pack(torch.zeros(k, n, dtype=torch.uint8), bits).numel() * 4 + groups * n * 2 + groups * n
    # int32 words, fp16 scales, uint8 zeros
    assert canonical == expected
    ql(torch.randn(2, k))  # picks the cpu backend on the CPU and converts qweight to its layout
    assert ql.qweight_layout != "canonical" or bits not in (3, 4)
    assert ql.storage_bytes() == canonical
