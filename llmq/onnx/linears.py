"""Each llmq Linear kind as ONNX: ``MatMul(x, DequantizeLinear(W^T codes))`` with explicit Q/DQ.

``emit_linear(b, module, x, name)`` appends the nodes computing ``module(x)`` for ``x [..., K]`` and
returns the output's name ``[..., N]``. Weights are stored transposed, ``[K, N]`` (MatMul's right
operand; also llmq's packed layout), so per-output-channel scales sit on ``axis=1`` and groups of
the input dimension are blocks along ``axis=0``:

=====================  ====================================================================
``nn.Linear``          float32 ``W^T`` initializer
``W8A8Linear`` static  ``x → QuantizeLinear(s_a, zp=int8 0) → DequantizeLinear`` (TensorRT's
                       explicit-quantization pattern), weight ``int8 [K, N]`` →
                       ``DequantizeLinear(scale [N], axis=1)``
``W8A8Linear`` dynamic ``s = max(ReduceMax(|x|, -1) / 127.5, fp16 tiny)``, then
                       ``QuantizeLinear/DequantizeLinear`` with that ``[..., 1]`` runtime scale
                       (blocked, ``block_size = K``): exact in onnxruntime; TensorRT accepts
                       only constant INT8 scales, so this graph is not a TensorRT INT8 graph
``QuantLinear``        codes ``[K, N]``: symmetric → int4/int8 ``code − 2**(b−1)`` and no zero
                       point, asymmetric → uint4/uint8 with the integer zeros; blocked
                       ``DequantizeLinear(axis=0, block_size=group)`` (per-axis ``axis=1`` for
                       one group); 2/3-bit codes are held in 4-bit types (exact, not smaller)
``FakeQuantLinear``    float ``W^T`` → ``QuantizeLinear → DequantizeLinear`` with its (fp16-rounded)
                       scales and zeros: the QAT graph TensorRT expects; 4/8 bits only
=====================  ====================================================================

Refused, with the fix: float zero points (HQQ: re-quantize with ``--zero-point int``), QAT at 2/3
bits (ONNX saturates at the 4-bit type's range: ``convert_qat`` first), any other module kind.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.nn.quant_linear import QuantLinear
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.observers import MIN_SCALE
from llmq.onnx.builder import GraphBuilder
from llmq.qat.fake_quant import FakeQuantLinear
from llmq.quant.packing import unpack


def emit_linear(b: GraphBuilder, module: nn.Module, x: str, name: str) -> str:
    """Nodes for ``module(x)``; returns the output name. ``name``: the module's dotted name."""
    if isinstance(module, W8A8Linear):
        w = _w8a8_weight(b, module, name)
        xq = _static_qdq(b, module, x, name) if module.static else _dynamic_qdq(b, module, x, name)
    elif isinstance(module, QuantLinear):
        if module.codebook is not None:
            raise ValueError(f"{name} has {module.levels} levels (codes index a codebook); the ONNX graph dequantizes "
                             f"integer grids with DequantizeLinear only: re-quantize with --levels uniform to export")
        xq, w = x, _quant_linear_weight(b, module, name)
    elif isinstance(module, FakeQuantLinear):
        xq, w = x, _fake_quant_weight(b, module, name)
    elif type(module) is nn.Linear:
        xq, w = x, b.init(f"{name}.weight_t", module.weight.detach().float().t())
    else:
        raise ValueError(f"{name}: no ONNX export for {type(module).__name__}; supported: nn.Linear, W8A8Linear, "
                         f"QuantLinear, FakeQuantLinear")
    y = b.op("MatMul", [xq, w], f"{name}/out")
    if module.bias is not None:
        y = b.op("Add", [y, b.init(f"{name}.bias", module.bias.detach().float())], f"{name}/biased")
    return y


def _w8a8_weight(b: GraphBuilder, m: W8A8Linear, name: str) -> str:
    codes = b.init(f"{name}.qweight_t", m.qweight.t().contiguous())  # int8 [K, N]
    scale = b.init(f"{name}.weight_scale", m.weight_scale.float())  # [N]
    return b.op("DequantizeLinear", [codes, scale], f"{name}/weight", axis=1)  # int8 codes, zero point 0


def _static_qdq(b: GraphBuilder, m: W8A8Linear, x: str, name: str) -> str:
    s = b.init(f"{name}.act_scale", m.act_scale.float().reshape(()))
    zp = b.const(0, "int8")
    q = b.op("QuantizeLinear", [x, s, zp], f"{name}/act_q")
    return b.op("DequantizeLinear", [q, s, zp], f"{name}/act_dq")


def _dynamic_qdq(b: GraphBuilder, m: W8A8Linear, x: str, name: str) -> str:
    amax = b.op("ReduceMax", [b.op("Abs", [x]), b.const([-1], "int64")], f"{name}/act_amax", keepdims=1)
    s = b.op("Max", [b.op("Div", [amax, b.const(127.5)]), b.const(MIN_SCALE)], f"{name}/act_scale")
    tp = b.onnx.TensorProto
    q = b.op("QuantizeLinear", [x, s], f"{name}/act_q", axis=-1, block_size=m.in_features, output_dtype=tp.INT8)
    return b.op("DequantizeLinear", [q, s], f"{name}/act_dq", axis=-1, block_size=m.in_features)


def _blocking(group: int, k: int, groups: int) -> dict:
    return {"axis": 1} if groups == 1 else {"axis": 0, "block_size": group}


def _codes_init(b: GraphBuilder, name: str, codes: torch.Tensor, bits: int, signed: bool) -> str:
    if bits <= 4:
        return b.init_4bit(name, codes, signed)
    return b.init(name, codes.to(torch.int8 if signed else torch.uint8))


def _quant_linear_weight(b: GraphBuilder, m: QuantLinear, name: str) -> str:
    if m.zeros is not None:
        raise ValueError(f"{name}: float zero points (HQQ-style) have no ONNX form — DequantizeLinear's zero point "
                         f"is an integer of the code type; re-quantize with --zero-point int")
    k, g = m.in_features, m.effective_group_size
    codes = unpack(m.canonical_qweight(), m.bits, k).to(torch.int16)  # [K, N] unsigned
    scales = m.scales.float()  # [G, N]
    groups = scales.shape[0]
    if groups == 1:
        scales = scales[0]
    inputs: list[str]
    if m.symmetric:
        codes = codes - (1 << (m.bits - 1))
        w = _codes_init(b, f"{name}.qweight_t", codes, m.bits, signed=True)
        inputs = [w, b.init(f"{name}.scales", scales)]
    else:
        zeros = m.qzeros.to(torch.int16)
        zeros = zeros[0] if groups == 1 else zeros
        w = _codes_init(b, f"{name}.qweight_t", codes, m.bits, signed=False)
        inputs = [w, b.init(f"{name}.scales", scales), _codes_init(b, f"{name}.zeros", zeros, m.bits, signed=False)]
    return b.op("DequantizeLinear", inputs, f"{name}/weight", **_blocking(g, k, groups))


def _fake_quant_weight(b: GraphBuilder, m: FakeQuantLinear, name: str) -> str:
    if m.bits not in (4, 8):
        raise ValueError(f"{name}: {m.bits}-bit fake quantization has no ONNX QuantizeLinear type (int4/int8 "
                         f"saturate at their own range): run llmq.qat.convert_qat(model) first to export the "
                         f"codes with DequantizeLinear")
    qw = m.quantized_weight()  # codes [N, K], scales/zeros [N, G]
    k = m.in_features
    groups = qw.scales.shape[1]
    g = k if m.group_size is None else min(m.group_size, k)
    scales = qw.scales.float().t().contiguous()  # [G, N]
    zeros = qw.zeros.to(torch.int16).t().contiguous()
    if groups == 1:
        scales, zeros = scales[0], zeros[0]
    tp = b.onnx.TensorProto
    w = b.init(f"{name}.weight_t", m.weight.detach().float().t())
    s = b.init(f"{name}.scales", scales)
    attrs = _blocking(g, k, groups)
    if m.symmetric:
        q = b.op("QuantizeLinear", [w, s], f"{name}/weight_q", output_dtype=tp.INT4 if m.bits == 4 else tp.INT8,
                 **attrs)
        return b.op("DequantizeLinear", [q, s], f"{name}/weight", **attrs)
    zp = _codes_init(b, f"{name}.zeros", zeros, m.bits, signed=False)
    q = b.op("QuantizeLinear", [w, s, zp], f"{name}/weight_q", **attrs)
    return b.op("DequantizeLinear", [q, s, zp], f"{name}/weight", **attrs)
