import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.quant.packing import codes_per_word, pack, packed_rows, unpack

BITS = [2, 3, 4, 8]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), k=st.integers(1, 300), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip_bit_exact(bits, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(k, bits), n)
    assert torch.equal(unpack(packed, bits, k), codes)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_documented_layout(bits):
    """Field i of word r holds code r*P + i, lowest bits first."""
    p = codes_per_word(bits)
    k = 2 * p + 1
    codes = torch.randint(0, 1 << bits, (k, 3), dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits).to(torch.int64) & 0xFFFFFFFF  # view words as unsigned
    for kk in range(k):
        r, i = divmod(kk, p)
        field = (packed[r] >> (i * bits)) & ((1 << bits) - 1)
        assert torch.equal(field, codes[kk].to(torch.int64))


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_extreme_codes_use_sign_bit(bits):
    codes = torch.full((codes_per_word(bits), 2), (1 << bits) - 1, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits, codes.shape[0]), codes)
    if bits != 3:  # 3-bit words leave bits 30-31 unused
        assert (packed == -1).all()


def test_padding_code_fills_last_word():
    codes = torch.zeros(5, 1, dtype=torch.uint8)
    packed = pack(codes, 4, pad_code=7)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0x77700000


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range for 2 bits"):
        pack(torch.tensor([[4]], dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_width(bits):
    with pytest.raises(ValueError, match="supported widths"):
        pack(torch.zeros(4, 4, dtype=torch.uint8), bits)


def test_unpack_checks_rows():
    with pytest.raises(ValueError, match="need"):
        unpack(torch.zeros(3, 4, dtype=torch.int32), 4, k=100)


def test_pack_roundtrip_large_matrix():
    """A 4096x4096 int4 matrix (16.8M codes) round-trips bit-exactly."""
    codes = torch.randint(0, 16, (4096, 4096), dtype=torch.uint8)
    packed = pack(codes, 4)
    assert torch.equal(unpack(packed, 4, 4096), codes)
