"""KV-layout quantizer: bit-exact packing, error bounds per axis and bit width, byte counts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.quant.kv import (dequantize_kv, kv_block_nbytes, pack_tokens, quantize_per_channel, quantize_per_token,
                           unpack_tokens)
from llmq.quant.packing import codes_per_word


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), b=st.integers(1, 3), h=st.integers(1, 3), words=st.integers(1, 4),
       d=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_pack_tokens_round_trip(bits, b, h, words, d, seed):
    g = torch.Generator().manual_seed(seed)
    t = words * codes_per_word(bits)
    codes = torch.randint(0, 1 << bits, (b, h, t, d), generator=g, dtype=torch.uint8)
    packed = pack_tokens(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (b, h, words, d)
    assert torch.equal(unpack_tokens(packed, bits), codes)


def test_pack_tokens_layout_is_llmq_packing_along_tokens():
    """Field i of word row w holds token w*P + i of the same channel."""
    codes = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 16, 1) % 16  # 4-bit codes of tokens 0..15
    words = pack_tokens(codes, 4)
    assert words.shape == (1, 1, 2, 1)
    assert words[0, 0, 0, 0].item() == sum(i << (4 * i) for i in range(8))
    assert words[0, 0, 1, 0].item() == sum(((8 + i) << (4 * i)) for i in range(8)) - (1 << 32)  # int32 wraps


def test_pack_tokens_needs_whole_words():
    with pytest.raises(ValueError, match="not a multiple of 8"):
        pack_tokens(torch.zeros(1, 1, 12, 4, dtype=torch.uint8), 4)


def test_dequantize_first_tokens_of_a_word():
    """``n_tokens`` may end inside a word row (crop): the first tokens come back exactly."""
    x = torch.randn(1, 2, 32, 16)
    q = quantize_per_token(x, 4, 16, False)
    full = dequantize_kv(q, 4, 16, False)
    assert torch.equal(dequantize_kv(q, 4, 16, False, n_tokens=13), full[:, :, :13])


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
