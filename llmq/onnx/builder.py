"""A small ONNX graph builder: unique names, initializers from torch tensors, int4 packing.

Only the ``onnx`` helper API is used (``onnx.helper``, ``onnx.numpy_helper``); nothing here knows
about models. Initializers are float32 unless said otherwise; int4/uint4 tensors are packed two
codes per byte, low nibble first (the ONNX 4-bit layout), and written as raw bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from llmq.onnx.deps import require_onnx

OPSET = 21  # blocked DequantizeLinear/QuantizeLinear (block_size), int4/uint4 types


class GraphBuilder:
    """Collects nodes and initializers; ``op`` returns the new output's name."""

    def __init__(self) -> None:
        self.onnx = require_onnx()
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        """``base``, or ``base_<n>`` if already taken (ONNX names must be unique)."""
        out, n = base, 1
        while out in self._names:
            out, n = f"{base}_{n}", n + 1
        self._names.add(out)
        return out

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        out = self.name(name or op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=self.name(f"{out}/{op_type}"),
                                                     **attrs))
        return out

    def op_multi(self, op_type: str, inputs: list[str], names: list[str], **attrs) -> list[str]:
        """A node with several outputs (``Split``); returns their names."""
        outs = [self.name(n) for n in names]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outs, name=self.name(f"{outs[0]}/{op_type}"),
                                                     **attrs))
        return outs

    def init(self, name: str, t: torch.Tensor | np.ndarray) -> str:
        """An initializer from a tensor (its dtype kept; bf16/fp16 float tensors become float32)."""
        a = t.detach().cpu() if torch.is_tensor(t) else t
        if torch.is_tensor(a):
            a = (a.float() if a.is_floating_point() else a).numpy()
        name = self.name(name)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.array(a, order="C"), name))  # 0-d stays 0-d
        return name

    def init_4bit(self, name: str, codes: torch.Tensor, signed: bool) -> str:
        """An int4 (``signed``, values -8..7) or uint4 (0..15) initializer from integer ``codes``."""
        helper, tp = self.onnx.helper, self.onnx.TensorProto
        flat = codes.detach().cpu().to(torch.int16).reshape(-1)
        lo, hi = (-8, 7) if signed else (0, 15)
        if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
            raise ValueError(f"{name}: codes outside [{lo}, {hi}] cannot be stored as {'int4' if signed else 'uint4'}")
        nib = (flat & 0xF).to(torch.uint8)
        if nib.numel() % 2:
            nib = torch.cat([nib, nib.new_zeros(1)])
        packed = (nib[0::2] | (nib[1::2] << 4)).numpy().tobytes()
        name = self.name(name)
        self.initializers.append(helper.make_tensor(name, tp.INT4 if signed else tp.UINT4, list(codes.shape),
                                                    packed, raw=True))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A shared scalar / small-vector constant initializer."""
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init("const", a)
        return self._consts[key]
