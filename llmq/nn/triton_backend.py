"""Triton backends for ``QuantLinear``: fused dequantize-matmul straight from packed words.

Two registered names, one implementation:

* ``"triton"`` — CUDA (compute capability >= 8.0). First in ``WEIGHT_MATMUL``'s preference, so
  ``QuantLinear`` picks it automatically on CUDA (the choice is logged once).
* ``"triton-interpret"`` — the same kernels on CPU through Triton's interpreter, only when
  ``TRITON_INTERPRET=1``. Forced-only in ``llmq.backend_choice`` (automatic choice never lands on
  it): it runs only when forced (``backend="triton-interpret"`` or
  ``LLMQ_BACKEND=triton-interpret``). It exists for tests and debugging — the interpreter is
  orders of magnitude slower than the torch backend.

Forcing ``"triton"`` on a CPU input raises ``ValueError`` with the reason (and the hint above)
instead of falling back.

The kernels read the tiled layout (``llmq.kernels.dequant_tile``): the layer converts its
``qweight`` to it in place before the first forward (``QuantLinear.use_qweight_layout``, once per
layer, on the layer's device), so the packed weight is held once. ``state_dict`` still gives the
canonical layout, and ``load_state_dict`` converts back first (``llmq.nn.layouts``).

Layers with non-uniform levels (a ``codebook`` buffer, ``[1 or N, 2**bits]`` fp16: nf, log2, binary,
kmeans) run the lookup-table kernels (``llmq.kernels.lut_matmul``) on the same tiled layout.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except ImportError as e:  # triton is a hard dependency of llmq
    raise ImportError("llmq needs triton for its kernels: pip install 'triton>=3.6' "
                      "(Linux; on other platforms use a Linux machine or container)") from e

from llmq.backend_choice import INTERPRET, WEIGHT_MATMUL, triton_device_check
from llmq.kernels._launch import ACT_DTYPES
from llmq.kernels.dequant_matmul import dequant_matmul
from llmq.kernels.lut_matmul import lut_matmul
from llmq.nn.backends import LinearSpec
from llmq.nn.layouts import TILED

MIN_CAPABILITY = (8, 0)  # bf16 tensor-core dots and cp.async pipelining


@torch.compiler.assume_constant_result  # a constant while torch.compile traces a first-call backend choice
def cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


class TritonBackend:
    """Fused dequantize-matmul kernels (``llmq.kernels.dequant_matmul``) on CUDA."""

    name = "triton"
    layout = TILED

    def can_implement(self, spec: LinearSpec) -> tuple[bool, str]:
        if spec.act_dtype not in ACT_DTYPES:
            return False, f"activations must be float16, bfloat16 or float32, got {spec.act_dtype}"
        declined = triton_device_check(spec.device_type, interpret=False)
        if declined:
            return declined
        cap = cuda_capability()
        if cap < MIN_CAPABILITY:
            return False, f"needs compute capability >= {MIN_CAPABILITY}, this GPU has {cap}"
        return True, f"fused dequantize-matmul Triton kernels, {spec.bits}-bit, CUDA sm_{cap[0]}{cap[1]}"

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        codebook = getattr(layer, "codebook", None)
        if codebook is not None:  # non-uniform levels: w = codebook[row, code] * scale (no zero points)
            if layer.zero_points is not None:
                raise ValueError("a layer with a codebook has no zero points: w = codebook[code] * scale")
            return lut_matmul(x, layer.qweight, codebook, layer.scales, layer.bias, layer.bits,
                              layer.effective_group_size, layer.in_features)
        return dequant_matmul(x, layer.qweight, layer.scales, layer.zero_points, layer.bias, layer.bits,
                              layer.effective_group_size, layer.in_features)


class TritonInterpreterBackend(TritonBackend):
    """The same kernels on CPU under ``TRITON_INTERPRET=1``; only ever used when forced."""

    name = INTERPRET

    def can_implement(self, spec: LinearSpec) -> tuple[bool, str]:
        if spec.act_dtype not in ACT_DTYPES:
            return False, f"activations must be float16, bfloat16 or float32, got {spec.act_dtype}"
        return triton_device_check(spec.device_type, interpret=True)


WEIGHT_MATMUL.register(TritonBackend())
WEIGHT_MATMUL.register(TritonInterpreterBackend())
