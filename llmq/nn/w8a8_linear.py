"""``W8A8Linear``: int8 weights (per output channel) x int8 activations (per token or per tensor).

Weights come from ``llmq.quant.primitives.quantize_weight(w, bits=8,
group_size=None, symmetric=True)``: unsigned codes with zero point 128 and an
fp16-representable scale per output channel. The GEMM wants *signed* int8, so
the module stores ``qweight = code - 128`` (``[-128, 127]``); dequantized
``W[n, k] = qweight[n, k] * weight_scale[n]`` — the same value the primitives give.

Activations are quantized on the way in by ``llmq.kernels.act_quant``:
dynamic = one scale per token row computed at every call; static = the stored
per-tensor ``act_scale`` from calibration (``llmq.observers``). Then
``y = int8_gemm(q, qweight, a_scale, weight_scale, bias)`` with exact int32
accumulation.

Backends register into ``llmq.backend_choice.W8A8_MATMUL`` (op kind ``w8a8-matmul``), which
tries ``triton`` (CUDA) then the ``torch`` reference; ``backend=`` / ``LLMQ_BACKEND`` forces one,
and a forced backend that cannot run raises with its reason (no silent fallback).
``triton-interpret`` runs the same kernels on CPU under ``TRITON_INTERPRET=1`` when forced
(tests) — never picked automatically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmq.backend_choice import INTERPRET, W8A8_MATMUL, triton_device_check
from llmq.kernels.act_quant import act_quant, act_quant_reference
from llmq.kernels.int8_gemm import int8_gemm, int8_gemm_reference
from llmq.nn.backends import BackendChoice
from llmq.nn.registry import check_config_shape, register_module_kind
from llmq.quant.primitives import quantize_weight, symmetric_zero
from llmq.recipes import ActScheme


@dataclass(frozen=True)
class W8A8Spec:
    in_features: int
    out_features: int
    static: bool
    device_type: str
    act_dtype: torch.dtype


class TorchW8A8Backend:
    """Reference: ``act_quant_reference`` + exact int32 matmul (``torch._int_mm`` / float64) + fp32 epilogue."""

    name = "torch"

    def can_implement(self, spec: W8A8Spec) -> tuple[bool, str]:
        return True, "pure-torch int8 reference runs every layer on every device"

    def forward(self, layer: "W8A8Linear", x: torch.Tensor) -> torch.Tensor:
        q, a_scale = act_quant_reference(x, layer.act_scale_fp32())
        return int8_gemm_reference(q, layer.qweight, a_scale, layer.weight_scale.float(), layer.bias, x.dtype)


class TritonW8A8Backend:
    """``llmq.kernels.act_quant`` + ``llmq.kernels.int8_gemm`` on CUDA (``"triton"``), or on CPU through
    the Triton interpreter (``"triton-interpret"``: tests/debugging only, never chosen automatically) —
    the same names as ``QuantLinear``'s Triton backends, so ``LLMQ_BACKEND`` means one thing."""

    def __init__(self, interpret: bool = False) -> None:
        self.interpret = interpret
        self.name = INTERPRET if interpret else "triton"

    def can_implement(self, spec: W8A8Spec) -> tuple[bool, str]:
        if spec.act_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False, f"activations {spec.act_dtype} are not float16/bfloat16/float32"
        return triton_device_check(spec.device_type, self.interpret) or (True, "CUDA int8 tensor-core GEMM")

    def forward(self, layer: "W8A8Linear", x: torch.Tensor) -> torch.Tensor:
        q, a_scale = act_quant(x, layer.act_scale_fp32())
        return int8_gemm(q, layer.qweight, a_scale, layer.weight_scale.float(), layer.bias, x.dtype)


W8A8_MATMUL.register(TritonW8A8Backend())
W8A8_MATMUL.register(TorchW8A8Backend())
W8A8_MATMUL.register(TritonW8A8Backend(interpret=True))


@register_module_kind
class W8A8Linear(BackendChoice, nn.Module):
    """``y = quant8(x) @ qweight.T * scales + bias`` with int8 x int8 -> int32 matmul.

    Buffers (K = in_features, N = out_features)::

        qweight       [N, K]  int8     signed weight codes (primitives' unsigned code - 128)
        weight_scale  [N]     float32  per-output-channel scale (fp16-representable)
        act_scale     [1]     float32  static per-tensor activation scale; absent (None) for dynamic
        bias          [N]     float    optional

    Scales are fp16-representable and stay exact: ``from_pretrained(dtype=...)`` keeps the
    checkpoint's float32 (checked on transformers 5.24), a cast to fp16 is exact, and a cast that
    would round them (``.bfloat16()``) leaves them float32 (``QuantizedBuffers._apply``).
    """

    KIND = "w8a8_linear"
    BACKENDS = W8A8_MATMUL
    FP16_VALUED_BUFFERS = ("weight_scale", "act_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 act_scheme: ActScheme | str = ActScheme.DYNAMIC, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, backend: str | None = None) -> None:
        super().__init__()
        try:
            self.act_scheme = ActScheme(act_scheme)
        except ValueError:
            raise ValueError(f"unknown act_scheme {act_scheme!r}: choose one of {[s.value for s in ActScheme]}") from None
        self.in_features = in_features
        self.out_features = out_features
        self.backend_name = backend
        self._backend: dict[tuple[str, torch.dtype], object] = {}
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if self.act_scheme is ActScheme.STATIC:
            self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.act_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None

    @property
    def static(self) -> bool:
        return self.act_scheme is ActScheme.STATIC

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_scale: torch.Tensor | float | None = None, name: str = "linear",
                    backend: str | None = None) -> "W8A8Linear":
        """Quantize ``linear``'s weight (int8 per output channel); ``act_scale`` given = static scheme.

        ``act_scale`` is rounded *up* to an fp16-representable value (so a checkpoint
        loaded in fp16 keeps it and the calibrated range stays covered).
        """
        w = linear.weight.detach()
        qw = quantize_weight(w.float(), bits=8, group_size=None, symmetric=True, name=name)
        scheme = ActScheme.DYNAMIC if act_scale is None else ActScheme.STATIC
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias=bias is not None, act_scheme=scheme,
                    dtype=None if bias is None else bias.dtype, device=w.device, backend=backend)
        layer.qweight.copy_((qw.codes.to(torch.int16) - symmetric_zero(8)).to(torch.int8))
        layer.weight_scale.copy_(qw.scales[:, 0])
        if act_scale is not None:
            s = torch.as_tensor(act_scale, dtype=torch.float32).reshape(1)
            if not (torch.isfinite(s).all() and (s > 0).all()):
                raise ValueError(f"{name}: static activation scale must be positive and finite, got {s.item()}")
            s16 = s.to(torch.float16)
            s16 = torch.where(s16.float() < s, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
            layer.act_scale.copy_(s16.float())
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def act_scale_fp32(self) -> torch.Tensor | None:
        return None if self.act_scale is None else self.act_scale.float()

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``[N, K]`` weight the codes stand for."""
        return self.qweight.float() * self.weight_scale.float()[:, None]

    def to_config(self) -> dict:
        # bits / group_size / symmetric describe the weights (as QuantLinear's config does, for `llmq inspect`)
        return {"kind": self.KIND, "in_features": self.in_features, "out_features": self.out_features,
                "bits": 8, "group_size": None, "symmetric": True, "act_bits": 8, "act_scheme": self.act_scheme.value}

    @classmethod
    def from_config(cls, cfg: dict, in_features: int, out_features: int, bias: bool,
                    dtype: torch.dtype | None = None, device=None) -> "W8A8Linear":
        check_config_shape(cfg, in_features, out_features)
        return cls(in_features, out_features, bias=bias, act_scheme=cfg.get("act_scheme", "dynamic"),
                   dtype=dtype, device=device)

    def activation_dtype_hint(self) -> torch.dtype:
        # the bias follows the model's dtype; the scales do not (QuantizedBuffers._apply)
        return self.bias.dtype if self.bias is not None else torch.get_default_dtype()

    def spec(self, x: torch.Tensor) -> W8A8Spec:
        return W8A8Spec(self.in_features, self.out_features, self.static, x.device.type, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"W8A8Linear expects inputs with last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self.backend_for(x).forward(self, x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act_scheme={self.act_scheme.value}, bias={self.bias is not None}")
