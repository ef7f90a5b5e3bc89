"""Build random ``PackedKV`` caches for the decode-attention tests."""

import torch

from llmq.kernels.kv_attention import PackedKV
from llmq.quant.kv import quantize_per_channel, quantize_per_token


def _pad_tokens(x: torch.Tensor, extra: int) -> torch.Tensor:
    # spare capacity after the valid tokens, filled with garbage the kernel must not read
    if extra == 0:
        return x.contiguous()
    pad = torch.randint_like(x[:, :, :extra], 0, 100) if not x.is_floating_point() else torch.randn_like(
        x[:, :, :extra].float()).to(x.dtype)
    return torch.cat([x, pad], dim=2).contiguous()


def make_packed_kv(b, hkv, n_quant, n_res, d, bits, group, per_channel, symmetric, dtype, spare=0):
    """Random keys/values with key-channel outliers; the first ``n_quant`` tokens quantized."""
    k = torch.randn(b, hkv, n_quant + n_res, d) * (1 + 4 * (torch.arange(d) % 7 == 0))  # outlier channels
    v = torch.randn(b, hkv, n_quant + n_res, d)
    qk = (quantize_per_channel if per_channel else quantize_per_token)(k[:, :, :n_quant], bits, group, symmetric)
    qv = quantize_per_token(v[:, :, :n_quant], bits, group, symmetric)
    kspare = spare // group if per_channel else spare
    return PackedKV(
        k_codes=_pad_tokens(qk.codes, spare), k_scales=_pad_tokens(qk.scales, kspare),
        k_zeros=None if symmetric else _pad_tokens(qk.zeros, kspare),
        v_codes=_pad_tokens(qv.codes, spare), v_scales=_pad_tokens(qv.scales, spare),
        v_zeros=None if symmetric else _pad_tokens(qv.zeros, spare),
        n_quant=n_quant, k_res=k[:, :, n_quant:].to(dtype), v_res=v[:, :, n_quant:].to(dtype),
        bits=bits, group_size=group, key_per_channel=per_channel, symmetric=symmetric,
    )
