"""KV-layout quantizer: bit-exact packing, error bounds per axis and bit width, byte counts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.quant.kv import (dequantize_kv, kv_block_nbytes, pack_last, quantize_per_channel, quantize_per_token,
                           unpack_last)
from llmq.quant.packing import codes_per_word


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       words=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_last_round_trip(bits, lead, words, seed):
    g = torch.Generator().manual_seed(seed)
    d = words * codes_per_word(bits)
    codes = torch.randint(0, 1 << bits, (*lead, d), generator=g, dtype=torch.uint8)
    packed = pack_last(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (*lead, words)
    assert torch.equal(unpack_last(packed, bits, d), codes)


def test_pack_last_layout_is_llmq_packing_along_last_axis():
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)  # 4-bit codes 0..7 in one word
    assert pack_last(codes, 4).item() == sum(i << (4 * i) for i in range(8))


def _per_element_scale(block, per_channel, group, t, d):
    if per_channel:
        return block.scales.float().repeat_interleave(group, dim=2)[:, :, :t]
    return block.scales.float().repeat_interleave(group, dim=3)[..., :d]


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "token"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_error_bound(bits, per_channel, symmetric):
    b, h, t, d, group = 2, 3, 64, 64, 32
    x = torch.randn(b, h, t, d) * (1 + 5 * (torch.arange(d) % 9 == 0))  # outlier channels
    x[0, 0, :32] = 0.0  # all-zero groups must not divide by zero
    x[1, 1, :32, :] = 0.75  # constant groups
    q = (quantize_per_channel if per_channel else quantize_per_token)(x, bits, group, symmetric)
    assert (q.zeros is None) == symmetric
    y = dequantize_kv(q, bits, group, per_channel)
    scale = _per_element_scale(q, per_channel, group, t, d)
    assert torch.all((y - x).abs() <= scale / 2 * (1 + 1e-6))
    assert torch.equal(y[0, 0, :32], torch.zeros_like(y[0, 0, :32]))


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    """KIVI's observation, reproduced: keys have a few channels with a large, steady magnitude; per-token
    groups must stretch their range over them, per-channel groups do not."""
    offset = 20.0 * (torch.arange(64) % 16 == 0) * torch.sign(torch.randn(64))
    x = torch.randn(1, 2, 128, 64) + offset
    err = {}
    for name, fn in (("channel", quantize_per_channel), ("token", quantize_per_token)):
        err[name] = (dequantize_kv(fn(x, 2, 32, False), 2, 32, name == "channel") - x).pow(2).mean()
    assert err["channel"] < 0.5 * err["token"]


def test_per_channel_needs_whole_groups():
    with pytest.raises(ValueError, match="whole groups of 32 tokens"):
        quantize_per_channel(torch.randn(1, 1, 40, 64), 4, 32, False)


@pytest.mark.parametrize("bits, per_channel, symmetric", [(4, True, False), (2, False, True), (8, False, False)],
                         ids=["int4-channel-asym", "int2-token-sym", "int8-token-asym"])
def test_nbytes_matches_tensors(bits, per_channel, symmetric):
    b, h, t, d, group = 2, 3, 64, 64, 32
    q = (quantize_per_channel if per_channel else quantize_per_token)(torch.randn(b, h, t, d), bits, group, symmetric)
    actual = sum(x.numel() * x.element_size() for x in (q.codes, q.scales, q.zeros) if x is not None)
    assert kv_block_nbytes(t, b, h, d, bits, group, per_channel, symmetric) == actual
