"""Dequantize-to-scratch + matmul regime (``kernels/dequant_scratch.py``) and the crossover table
(``kernels/crossover.py``), under the interpreter."""

import json
import logging

import pytest
import torch

from llmq.kernels import crossover
from llmq.kernels.dequant_matmul import dequant_matmul, regime_for
from llmq.kernels.dequant_scratch import dequantize_tiled, scratch
from llmq.kernels.dequant_tile import dequant_matmul_reference, dequantize_reference, repack_tiled
from llmq.nn.quant_linear import QuantLinear
from llmq.quant.primitives import quantize_weight


def _layer(bits, group, kind, k=300, n=70):
    w = torch.randn(n, k) / k**0.5
    if kind == "float":
        from llmq.algorithms import HQQ
        return QuantLinear.from_quantized(HQQ(w, bits, group, symmetric=False).quantize(), bias=torch.randn(n),
                                          backend="torch")  # canonical layout held
    return QuantLinear.from_quantized(quantize_weight(w, bits, group, kind == "none"), bias=torch.randn(n),
                                      backend="torch")  # canonical layout held (not the cpu backend's)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("kind", ["none", "int", "float"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_dequantized_weight_is_exact(bits, kind, dtype):
    """The dense weight equals the reference's fp32 weight rounded once to the activation dtype (integer
    zeros); float zeros: within the fp16 path's one extra rounding of zero·scale (every bit width, int3 included)."""
    layer = _layer(bits, 64, kind)
    tiled = repack_tiled(layer.qweight, bits, 300)
    w = dequantize_tiled(tiled, layer.scales, layer.zero_points, bits, 64, 300, dtype)
    ref = dequantize_reference(layer.qweight, layer.scales, layer.zero_points, bits, 64, 300)
    assert w.shape == (300, 70) and w.dtype == dtype
    if kind == "float" and dtype == torch.float16:  # int3 too: it is on the fp16x2 path
        torch.testing.assert_close(w.float(), ref, atol=2e-3 * ref.abs().max().item(), rtol=2e-3)
    else:
        assert torch.equal(w, ref.to(dtype))


@pytest.mark.parametrize("m", [1, 33, 129], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_forced_scratch_regime_matches_reference(m, dtype, kernel_tol):
    layer = _layer(4, 128, "int", k=520, n=200)
    x = torch.randn(m, 520).to(dtype)
    tiled = repack_tiled(layer.qweight, 4, 520)
    args = (layer.scales, layer.zero_points, layer.bias, 4, 128, 520)
    y = dequant_matmul(x, tiled, *args, force="scratch")
    ref = dequant_matmul_reference(x, layer.qweight, *args)
    assert y.dtype == dtype and y.shape == (m, 200)
    torch.testing.assert_close(y, ref, **kernel_tol[dtype])


def test_scratch_buffer_is_shared_and_grows():
    a = scratch(100, torch.float16, torch.device("cpu"))
    b = scratch(50, torch.float16, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr()  # reused, not reallocated
    c = scratch(1000, torch.float16, torch.device("cpu"))
    assert c.numel() == 1000 and scratch(10, torch.float16, torch.device("cpu")).data_ptr() == c.data_ptr()


def test_shipped_table_covers_every_bit_width():
    t = crossover.load_table()
    for dev in ("h200", "h100", "default"):
        for bits in ("2", "3", "4", "8"):
            for cls in ("small", "large"):
                e = t["devices"][dev][bits][cls]
                assert e["source"] in ("predicted", "measured") and 16 < e["scratch_min_m"]
                assert e["gemv_max_m"] == 16


def test_regime_follows_the_table(monkeypatch, caplog):
    table = {"version": 1, "devices": {"default": {"4": {"small": {"gemv_max_m": 8, "scratch_min_m": 256,
                                                                   "source": "measured"}}}}}
    monkeypatch.setattr(crossover, "load_table", lambda: table)
    monkeypatch.setattr(crossover, "_logged", set())
    with caplog.at_level(logging.INFO, logger="llmq"):
        assert [regime_for(m, 4, 1024, 1024) for m in (1, 8, 9, 255, 256, 4096)] == \
            ["gemv", "gemv", "gemm", "gemm", "scratch", "scratch"]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # logged once
    assert "measured" in caplog.records[0].message and "M >= 256" in caplog.records[0].message
    # no entry for this bit width / class: the built-in rule (gemv <= 16, never scratch)
    assert regime_for(17, 8, 1024, 1024) == "gemm" and regime_for(1 << 20, 8, 1024, 1024) == "gemm"


def test_unknown_table_version_is_an_error(tmp_path):
    path = tmp_path / "crossover.json"
    path.write_text(json.dumps({"version": 99, "devices": {}}))
    with pytest.raises(ValueError, match="version 99.*kernel_cost.py --crossover"):
        crossover.load_table(str(path))


def test_shape_class():
    assert crossover.shape_class(4096, 4096) == "small" and crossover.shape_class(8192, 28672) == "large"
