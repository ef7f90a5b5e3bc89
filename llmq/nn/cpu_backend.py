"""``"cpu"`` backend for ``QuantLinear``: torch's built-in CPU kernels on the packed weight.

* 2/3/4-bit, any group → ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (int4 "tinygemm").
* 8-bit per channel → ``torch.ops.aten._weight_int8pack_mm``.
* 8-bit with groups → two int4 calls, on the codes' high and low nibbles (the int8 kernel has one
  scale per output channel; ``code = 16 hi + lo``, so scales ``16 s`` and ``s`` per group are exact).

From ``llmq.nn.cpu_dequant.INT4_MIN_M`` / ``INT8_MIN_M`` rows of x on (prefill), the same held weight is dequantized to
bf16 in column chunks and multiplied with bf16 GEMMs instead, which measured faster there
(``llmq.nn.cpu_dequant``); same conventions, same error bound.

Registered between ``triton`` (CUDA) and ``torch`` (the reference), so it is the automatic choice
for CPU tensors; it declines (with its reason, and the torch backend runs) N not a multiple of 16
(the int4 pack needs it) and activations other than fp32/bf16/fp16.

Mapping llmq's ``W = (code - zero) * scale`` onto the kernels (exact algebra, rounded only as stated):

* int4 kernel, per kernel group of ``d`` input features: ``W = (q' - 8) * s' + z'`` with bf16 ``s'``,
  ``z'``, where the held code is ``q' = q - m + 8`` (``m = 2**(bits-1)``, llmq's middle code: 2/3-bit
  codes are held as 4-bit ones). llmq's weight is ``(q' - 8) * s + (m - zero) * s``, so ``s' =
  bf16(s)``, ``z' = bf16((m - zero) * s)``; ``z' = 0`` exactly when symmetric; float (HQQ) zeros too. ``d`` is the
  largest of 256/128/64/32 dividing both llmq's group and ``Kp`` (K padded to a multiple of 32); a
  group of llmq longer than ``d`` repeats its scale over several kernel groups, which is exact (K = 576
  with g128 runs as 9 kernel groups of 64). Padded input features get zero activations.
* int8 kernel: ``W = w8 * s'`` with signed ``w8 = code - 128`` and bf16 ``s'``; a zero other than 128
  adds ``rowsum(x) * (128 - zero) * s``, computed in fp32 (so ``m = 128`` below).
* split 8-bit: ``(hi - 8) * 16 s' + bf16((128 - zero) * s)`` plus ``(lo - 8) * s' + 8 s'`` (``16 s'`` and
  ``8 s'`` are exact), summed in fp32: ``(code - 128) * s' + (128 - zero) * s`` (``m = 128``).

The kernels are fast only in bf16 (AVX-512/AVX2 paths; their fp32 and fp16 paths are 30-100x slower
here), so activations of every dtype are cast to bf16, run, and the output cast back. Error bound per
output, ``u = 2**-8`` (bf16 unit roundoff), ``w_k`` llmq's dequantized weight, ``e_k = s_k * (|q_k - m|
+ |m - zero_k|)`` (the second term not for the int8 kernel; ``+ 16 s_k`` for split 8-bit, whose
two partial outputs are rounded separately)::

    |y - x @ W.T| <= u * (sum_k |x_k| e_k  +  sum_k |x_k| |w_k|  +  |x @ W.T|)  (+ fp32 accumulation)

(scale/zero rounding, activation rounding — zero for bf16 inputs — and output rounding). For a bf16
model this is the same order as the torch backend's own rounding of the weight to bf16; for fp32
models it is bf16 precision instead of fp32. ``tests/nn/test_cpu_backend.py`` asserts it;
``docs/cpu_backend.md`` gives the perplexity it costs.
"""

from __future__ import annotations

import torch

from llmq.nn import cpu_dequant
from llmq.nn.backends import LinearSpec, register_backend
from llmq.nn.cpu_layout import INT8_OFFSET, padded_k
from llmq.nn.layouts import CPU, CPU_SPLIT

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernel takes, largest (fewest scale loads) first
INT4_N_MULTIPLE = 16
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_DTYPE = torch.bfloat16


def uses_int8_kernel(bits: int, group_size: int | None) -> bool:
    return bits == 8 and group_size is None


def kernel_group(k: int, group_size: int | None) -> int:
    """The int4 kernel's group length for a layer: divides llmq's group and the padded K."""
    kp = padded_k(k, False)
    return next(d for d in KERNEL_GROUPS if kp % d == 0 and (group_size is None or group_size % d == 0))


def int4_scale_zeros(layer) -> tuple[torch.Tensor, ...]:
    """``[Kp / d, N, 2]`` bf16 ``(s', z')`` per kernel group (see the module docstring); two of them
    (high nibbles, low nibbles) for split 8-bit."""
    k, bits = layer.in_features, layer.bits
    d = kernel_group(k, layer.group_size)
    n_groups = layer.scales.shape[0]
    # llmq group of each kernel group; padded kernel groups past K reuse the last (their x is 0)
    owner = (torch.arange(padded_k(k, False) // d) * d // layer.effective_group_size).clamp(max=n_groups - 1)
    s = layer.scales.float()[owner]  # [Kp/d, N]
    mid = float(1 << (bits - 1))
    zero = layer.zero_points.float()[owner] if layer.zero_points is not None else mid
    main = torch.stack([s, (mid - zero) * s], dim=-1).to(KERNEL_DTYPE)
    if bits != 8:
        return (main.contiguous(),)
    s_b = main[..., 0]
    high = torch.stack([16 * s_b, main[..., 1]], dim=-1).contiguous()  # x16 and x8 of a bf16: exact
    low = torch.stack([s_b, 8 * s_b], dim=-1).contiguous()
    return high, low


class CpuBackend:
    """torch's int4 / int8 CPU matmul kernels; weights held in the ``"cpu"`` layout (``llmq.nn.cpu_layout``)."""

    name = "cpu"
    layout = CPU

    def layout_for(self, bits: int, group_size: int | None) -> str:
        return CPU if bits != 8 or uses_int8_kernel(bits, group_size) else CPU_SPLIT

    def can_implement(self, spec: LinearSpec) -> tuple[bool, str]:
        if spec.device_type != "cpu":
            return False, f"runs on CPU tensors only, got {spec.device_type!r}"
        if spec.act_dtype not in ACT_DTYPES:
            return False, f"activations must be float32, bfloat16 or float16, got {spec.act_dtype}"
        if spec.levels != "uniform":
            return False, (f"{spec.levels} levels need a codebook lookup; torch's int4/int8 CPU kernels compute "
                           "(code - zero) * scale only")
        cpu_dequant.block64_layout()  # probed here, eagerly: forward may run inside torch.compile
        if uses_int8_kernel(spec.bits, spec.group_size):
            return True, "torch int8 CPU kernel (_weight_int8pack_mm), bf16 compute"
        if spec.out_features % INT4_N_MULTIPLE:
            return False, (f"out_features {spec.out_features} is not a multiple of {INT4_N_MULTIPLE}, "
                           "which torch's int4 CPU pack requires")
        how = "two calls on the high and low nibbles" if spec.bits == 8 else f"{spec.bits}-bit codes"
        return True, f"torch int4 CPU kernel (_weight_int4pack_mm_for_cpu), {how}, bf16 compute"

    def hold_inputs(self, layer) -> None:
        """Build the kernel-side scales and zeros of ``layer`` now (once its weight is held in this
        backend's layout), so that a ``torch.compile``d forward finds them (``_derived``)."""
        if uses_int8_kernel(layer.bits, layer.group_size):
            _derived(layer, _int8_params)
        else:
            _derived(layer, int4_scale_zeros)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        k, n = layer.in_features, layer.out_features
        int8_kernel = uses_int8_kernel(layer.bits, layer.group_size)
        kp = padded_k(k, int8_kernel)
        xb = x.reshape(-1, k).to(KERNEL_DTYPE)
        if kp != k:  # padded input features meet zero activations
            xb = torch.nn.functional.pad(xb, (0, kp - k))
        xb = xb.contiguous()
        # prefill: the kernels are tuned for small M; dequantize in chunks and run bf16 GEMMs (cpu_dequant)
        large_m = cpu_dequant.use_dequant(layer, xb.shape[0], int8_kernel)
        if int8_kernel:
            scales, zero_term = _derived(layer, _int8_params)
            if large_m:
                y = cpu_dequant.int8_matmul(xb, layer.qweight, scales)
            else:
                y = torch.ops.aten._weight_int8pack_mm(xb, layer.qweight, scales)
            if zero_term is not None:  # asymmetric: + rowsum(x) * (128 - zero) * s, in fp32
                y = y.float() + xb.float().sum(-1, keepdim=True) * zero_term
        else:
            d = kernel_group(k, layer.group_size)
            scale_zeros = _derived(layer, int4_scale_zeros)
            if large_m:
                y = cpu_dequant.int4_pack_matmul(xb, layer.qweight, scale_zeros, d)
            elif len(scale_zeros) == 1:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, layer.qweight, d, scale_zeros[0])
            else:  # split 8-bit: rows :N hold the high nibbles, N: the low ones; partial sums added in fp32
                y = (torch.ops.aten._weight_int4pack_mm_for_cpu(xb, layer.qweight[:n], d, scale_zeros[0]).float()
                     + torch.ops.aten._weight_int4pack_mm_for_cpu(xb, layer.qweight[n:], d, scale_zeros[1]))
        y = y.to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], n)


def _int8_params(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """bf16 ``[N]`` scales for the kernel, and fp32 ``[N]`` ``(128 - zero) * s`` (``None`` when zero is 128)."""
    s = layer.scales.float()[0]
    zero_term = None
    if layer.zero_points is not None:
        zero_term = (INT8_OFFSET - layer.zero_points.float()[0]) * s
    return s.to(KERNEL_DTYPE), zero_term


def _derived(layer, build):
    """Kernel-side scale/zero tensors of ``layer``, rebuilt whenever its buffers were replaced or edited.

    Held outside the layer's buffers (never saved, never moved) and keyed by the buffers' identity and
    version counters, so loading a state dict, ``.to()`` or an in-place edit of ``scales`` invalidates it.

    Inside ``torch.compile`` the tensors built eagerly are used as they are: dynamo cannot trace the
    data-pointer key, and inductor cannot lower the int4 kernel on scales computed inside the graph
    (its lowering binds them as a realized buffer). ``CpuBackend.hold_inputs`` builds them whenever the
    layer is prepared (``llmq.nn.prepare``, ``from_pretrained``, ``.to()``), and every eager forward checks
    them, so a compiled graph finds them; after editing ``scales`` or ``zero_points`` in place, run ``llmq.nn.prepare(model)``
    (or one eager forward) before the next compiled call.
    """
    if torch.compiler.is_compiling():
        cached = layer.__dict__.get("_cpu_kernel_params")
        if cached is None:
            raise RuntimeError(
                "the cpu backend's kernel scales were not built before torch.compile traced this QuantLinear: "
                "call llmq.nn.prepare(model) before compiling, or run one forward eagerly")
        return cached[1]
    zp = layer.zero_points
    key = (layer.scales.data_ptr(), layer.scales._version, layer.scales.dtype,
           None if zp is None else (zp.data_ptr(), zp._version))
    cached = layer.__dict__.get("_cpu_kernel_params")
    if cached is None or cached[0] != key:
        cached = (key, build(layer))
        layer.__dict__["_cpu_kernel_params"] = cached
    return cached[1]


register_backend(CpuBackend(), first=True)
