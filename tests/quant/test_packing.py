import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.quant.packing import codes_per_word, pack, pack_bitstream, packed_rows, unpack, unpack_bitstream

BITS = [1, 2, 3, 4, 8]


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


@pytest.mark.parametrize("bits", [5, 6, 16])
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


# --- dense bit streams (the export formats' layout) ---------------------------------------------


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 6), count=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_bitstream_roundtrip_and_documented_layout(bits, rows, count, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, count), generator=g, dtype=torch.int64).to(torch.uint8)
    words = pack_bitstream(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-count * bits // 32))
    assert torch.equal(unpack_bitstream(words, bits, count), codes)
    # code c = bits [c·b, (c+1)·b) of the row's little-endian stream, straddling words where it must
    stream = [sum(((int(w) & 0xFFFFFFFF) >> j & 1) << (32 * i + j) for i, w in enumerate(row) for j in range(32))
              for row in words[:2]]
    for r, value in enumerate(stream):
        assert [(value >> (c * bits)) & ((1 << bits) - 1) for c in range(count)] == codes[r].tolist()
        assert value >> (count * bits) == 0  # bits past the last code are 0


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"int{b}")
def test_bitstream_equals_word_packing_where_fields_fit(bits):
    """For 2, 4 and 8 bits no field straddles a word: the stream is ``pack``'s layout, transposed."""
    codes = torch.randint(0, 1 << bits, (96, 5), dtype=torch.int64).to(torch.uint8)  # [K, N]
    assert torch.equal(pack_bitstream(codes.t(), bits), pack(codes, bits).t())


def test_bitstream_matches_compressed_tensors():
    """The reference packer of the format (skipped where the package is not installed; not in CI)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in range(1, 9):
        for count in (1, 31, 33, 576):
            codes = torch.randint(0, 1 << bits, (3, count), dtype=torch.int64)
            signed = (codes - (1 << (bits - 1))).to(torch.int8)
            assert torch.equal(pack_bitstream(codes, bits), helpers.pack_to_int32(signed, bits)), (bits, count)


def test_bitstream_rejects_bad_input():
    with pytest.raises(ValueError, match="codes out of range for 3 bits"):
        pack_bitstream(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="packs 1- to 8-bit codes"):
        pack_bitstream(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="3 words per row, but 40 4-bit codes need 5"):
        unpack_bitstream(torch.zeros(2, 3, dtype=torch.int32), 4, 40)
