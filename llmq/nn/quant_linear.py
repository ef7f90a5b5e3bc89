"""``QuantLinear``: a weight-only quantized drop-in for ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import nn

from llmq.backend_choice import WEIGHT_MATMUL
from llmq.nn.backends import BackendChoice, LinearBackend, LinearSpec
from llmq.nn.layouts import CANONICAL, from_canonical, to_canonical
from llmq.nn.registry import check_config_shape, register_module_kind
from llmq.quant.packing import pack, packed_rows
from llmq.quant.primitives import SCALE_DTYPE, QuantizedWeight, effective_group_size, num_groups
from llmq.quant.levels import codebook_rows
from llmq.recipes import LEVEL_BITS, SUPPORTED_GROUP_SIZES, SUPPORTED_WEIGHT_BITS, Levels


@register_module_kind
class QuantLinear(BackendChoice, nn.Module):
    """``y = x @ dequant(W).T + bias`` with W stored as packed integer codes.

    Buffers (K = in_features, N = out_features, P = codes per int32 word,
    G = ceil(K / group_size), or 1 per channel)::

        qweight  [ceil(K / P), N]  int32    codes packed along K (llmq.quant.packing layout;
                                            = GPTQ qweight for 4/8 bit); codes past K are 0 and
                                            never used (every backend masks K)
        scales   [G, N]            float16  per-group scales
        qzeros   [G, N]            uint8    per-group integer zero points (zero_point="int"); absent
                                            when symmetric (zero = 2**(bits-1))
        zeros    [G, N]            float16  per-group float zero points instead (zero_point="float",
                                            HQQ-style)
        codebook [T, 2**bits]      float16  non-uniform levels only (``levels`` != "uniform",
                                            llmq.quant.levels): T = 1 (nf, log2, binary) or N (kmeans);
                                            ``None`` for uniform layers
        bias     [N]               float    optional

    Dequantized weight: ``W[n, k] = (code[k, n] - zero[k // g, n]) * scales[k // g, n]``, whichever
    kind the zero is (``zero_points`` gives the tensor or ``None``); with a codebook (always symmetric,
    no zeros) ``W[n, k] = codebook[0 if T == 1 else n, code[k, n]] * scales[k // g, n]``.

    Scales and float zeros hold fp16 values and keep them exactly: a cast of the model to a dtype
    that cannot represent every fp16 value (``.bfloat16()``) leaves them float16
    (``QuantizedBuffers._apply``) — a bf16 zero of an 8-bit group would be off by up to half a step.
    Casts to fp32 and back are exact and apply.

    ``forward`` runs through a backend chosen once per (device, dtype) by
    ``llmq.backend_choice.WEIGHT_MATMUL`` (triton -> cpu -> torch); ``backend=`` forces one. ``prepare(dtype)`` makes that choice
    (and the layout conversion below) eagerly; ``.to()`` and ``from_pretrained`` run it, so the first
    forward may be inside ``torch.compile``.

    ``qweight`` is held in one layout at a time (``qweight_layout``, see ``llmq.nn.layouts``): the
    layout above until a backend that reads another one runs (the Triton kernels read ``"tiled"``),
    which converts it in place — the packed weight is never held twice. ``state_dict()`` always gives
    the canonical layout and ``load_state_dict`` takes it; ``canonical_qweight()`` reads it.
    """

    KIND = "quant_linear"
    BACKENDS = WEIGHT_MATMUL
    FP16_VALUED_BUFFERS = ("scales", "zeros", "codebook")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        zero_point: str = "int",
        levels: str = "uniform",
    ) -> None:
        super().__init__()
        self.levels = Levels(levels).value
        if self.levels != "uniform":
            if bits not in LEVEL_BITS[Levels(levels)] or not symmetric:
                raise ValueError(f"{levels} levels take bits {LEVEL_BITS[Levels(levels)]} and symmetric=True, "
                                 f"got bits={bits}, symmetric={symmetric}")
        elif bits not in SUPPORTED_WEIGHT_BITS:
            raise ValueError(f"unsupported weight bits {bits}: choose one of {SUPPORTED_WEIGHT_BITS}")
        if group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"unsupported group size {group_size}: choose one of {SUPPORTED_GROUP_SIZES} or None")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        if zero_point not in ("int", "float"):
            raise ValueError(f"unknown zero_point {zero_point!r}: choose 'int' or 'float'")
        self.symmetric = symmetric
        self.zero_point = None if symmetric else zero_point
        self.backend_name = backend
        self._backend: dict[tuple[str, torch.dtype], LinearBackend] = {}
        self.qweight_layout = CANONICAL
        g = num_groups(in_features, group_size)
        self.register_buffer(
            "qweight", torch.zeros(packed_rows(in_features, bits), out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.ones(g, out_features, dtype=SCALE_DTYPE, device=device))
        # a registered buffer for the kind stored, a plain None attribute for the other
        zero_dtypes = {"qzeros": torch.uint8 if self.zero_point == "int" else None,
                       "zeros": SCALE_DTYPE if self.zero_point == "float" else None}
        for name, zero_dtype in zero_dtypes.items():
            if zero_dtype is None:
                setattr(self, name, None)
            else:
                self.register_buffer(name, torch.zeros(g, out_features, dtype=zero_dtype, device=device))
        if self.levels == "uniform":
            self.codebook = None
        else:
            rows = codebook_rows(self.levels, out_features)
            self.register_buffer("codebook", torch.zeros(rows, 1 << bits, dtype=SCALE_DTYPE, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None

    @property
    def zero_points(self) -> torch.Tensor | None:
        """``[G, N]`` zero points as stored (uint8 ``qzeros`` or float ``zeros``), ``None`` when symmetric."""
        return self.qzeros if self.qzeros is not None else self.zeros

    @property
    def effective_group_size(self) -> int:
        return effective_group_size(self.in_features, self.group_size)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str | None = None
    ) -> "QuantLinear":
        """Pack a ``QuantizedWeight`` (``[N, K]`` codes) into a new layer on the codes' device."""
        n, k = qw.shape
        layer = cls(k, n, qw.bits, qw.group_size, qw.symmetric, bias=bias is not None,
                    dtype=None if bias is None else bias.dtype, device=qw.codes.device, backend=backend,
                    zero_point="float" if qw.float_zeros else "int", levels=qw.levels)
        layer.qweight.copy_(pack(qw.codes.t(), qw.bits))
        if layer.codebook is not None:
            layer.codebook.copy_(qw.codebook.to(SCALE_DTYPE))
        layer.scales.copy_(qw.scales.t().to(SCALE_DTYPE))
        if layer.qzeros is not None:
            layer.qzeros.copy_(qw.zeros.t().to(torch.uint8))
        if layer.zeros is not None:
            layer.zeros.copy_(qw.zeros.t().to(SCALE_DTYPE))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        layer._prepare_if_runnable()
        return layer

    def to_config(self) -> dict:
        """JSON description stored per module in the checkpoint (see ``llmq.nn.registry``)."""
        cfg = {"kind": self.KIND, "in_features": self.in_features, "out_features": self.out_features,
               "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        if self.zero_point == "float":  # absent = integer zeros (as written before float zeros existed)
            cfg["zero_point"] = "float"
        if self.levels != "uniform":  # absent = uniform (as written before levels existed)
            cfg["levels"] = self.levels
        return cfg

    @classmethod
    def from_config(cls, cfg: dict, in_features: int, out_features: int, bias: bool,
                    dtype: torch.dtype | None = None, device=None) -> "QuantLinear":
        check_config_shape(cfg, in_features, out_features)
        return cls(in_features, out_features, cfg["bits"], cfg["group_size"], cfg["symmetric"], bias=bias,
                   dtype=dtype, device=device, zero_point=cfg.get("zero_point", "int"),
                   levels=cfg.get("levels", "uniform"))

    def spec(self, x: torch.Tensor) -> LinearSpec:
        return LinearSpec(self.in_features, self.out_features, self.bits, self.group_size, self.symmetric,
                          x.device.type, x.dtype, self.levels)

    def canonical_qweight(self) -> torch.Tensor:
        """``[ceil(K / P), N]`` int32 words in the canonical layout, whatever layout is held."""
        return to_canonical(self.qweight, self.qweight_layout, self.bits, self.in_features)

    def use_qweight_layout(self, layout: str) -> None:
        """Convert the held ``qweight`` to ``layout`` (no-op when already there).

        The new words replace the buffer, so the old ones are freed: only one layer's weight is ever
        held twice, for the duration of the conversion.
        """
        if layout == self.qweight_layout:
            return
        words = from_canonical(self.canonical_qweight(), layout, self.bits, self.in_features)
        self.register_buffer("qweight", words)
        self.qweight_layout = layout

    def activation_dtype_hint(self) -> torch.dtype:
        # the bias follows the model's dtype (.half(), from_pretrained(dtype=...)); the scales do not (see
        # _apply). The shipped backends read one layout for every float dtype on a device, so this only
        # picks which (device, dtype) choice is made, and logged, ahead of the first forward.
        return self.bias.dtype if self.bias is not None else torch.get_default_dtype()

    def _hold_inputs_of(self, backend: LinearBackend) -> None:
        self.use_qweight_layout(self.layout_read_by(backend))
        hold_inputs = getattr(backend, "hold_inputs", None)  # what a backend derives from the buffers (cpu)
        if hold_inputs is not None:
            hold_inputs(self)

    def layout_read_by(self, backend: LinearBackend) -> str:
        """The qweight layout ``backend`` reads for this layer: ``backend.layout``, or
        ``backend.layout_for(bits, group_size)`` for a backend whose layout depends on them (cpu)."""
        layout_for = getattr(backend, "layout_for", None)
        return backend.layout if layout_for is None else layout_for(self.bits, self.group_size)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() land here: hold the layout the new device's backend reads now, not
        # at the first forward (which may be inside torch.compile, where it cannot convert)
        result = super()._apply(fn, recurse)  # (BackendChoice keeps scales / float zeros exact)
        self._prepare_if_runnable()
        return result

    def _prepare_if_runnable(self) -> None:
        if self.qweight.device.type == "meta":
            return
        try:
            self.prepare()
        except ValueError:
            pass  # no backend runs here (e.g. forced "triton" still on CPU): forward raises with the reasons

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight_layout != CANONICAL:  # checkpoints keep the canonical layout
            destination[prefix + "qweight"] = self.canonical_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.use_qweight_layout(CANONICAL)  # incoming words are canonical; the next forward converts again
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects inputs with last dim {self.in_features}, got {tuple(x.shape)}")
        backend = self.backend_for(x)
        # checked per call, not once per backend choice: the layer may have run another backend since
        # (e.g. moved to CPU and back); a Python attribute compare, guarded by torch.compile
        layout = self.layout_read_by(backend)
        if self.qweight_layout != layout:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"QuantLinear holds its packed weight in the {self.qweight_layout!r} layout but backend "
                    f"{backend.name!r} reads {layout!r}, and the conversion cannot run inside "
                    "torch.compile: call llmq.nn.prepare(model, dtype) before compiling (from_pretrained and "
                    ".to() do it for the model's dtype), or run one forward eagerly")
            self.use_qweight_layout(layout)
        return backend.forward(self, x)

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else self.group_size
        zp = "" if self.zero_point in (None, "int") else f", zero_point={self.zero_point}"
        zp += "" if self.levels == "uniform" else f", levels={self.levels}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={g}, symmetric={self.symmetric}{zp}, bias={self.bias is not None}")
