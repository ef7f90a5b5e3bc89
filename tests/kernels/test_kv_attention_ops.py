"""Custom-op registration of the quantized-KV decode kernel: opcheck, fake tensors, torch.compile."""

import dataclasses

import pytest
import torch
from kv_helpers import make_packed_kv
from test_kv_attention import _to_cuda

from llmq.kernels.kv_attention import PackedKV, kv_decode_attention, kv_decode_attention_reference

D = 32


def _cache(per_channel=True, symmetric=False, dtype=torch.float16):
    # GQA 2: 4 query heads over 2 KV heads; 48 quantized + 5 residual tokens, spare capacity after them
    return make_packed_kv(2, 2, 48, 5, D, 4, 16, per_channel, symmetric, dtype, spare=16)


def _op_args(q, kv: PackedKV, mask=None):
    return (q, kv.k_codes, kv.k_scales, kv.k_zeros, kv.v_codes, kv.v_scales, kv.v_zeros, kv.k_res, kv.v_res, mask,
            kv.n_quant, kv.bits, kv.group_size, kv.key_per_channel, kv.symmetric, D ** -0.5)


def _mask():
    mask = torch.ones(2, 53, dtype=torch.bool)
    mask[1, :20] = False  # left padding of row 1
    return mask


@pytest.mark.parametrize("per_channel, symmetric, strided_q, with_mask", [
    pytest.param(True, False, False, True, id="int4-channel-asym-mask"),
    pytest.param(False, True, True, False, id="int4-token-sym-strided-q"),
])
def test_custom_op_opcheck(per_channel, symmetric, strided_q, with_mask):
    """Schema (no mutation, no aliasing), autograd registration, fake impl vs real, AOT dispatch (dynamic)."""
    kv = _cache(per_channel, symmetric)
    q = torch.randn(2, D, 4).half().transpose(1, 2) if strided_q else torch.randn(2, 4, D).half()
    mask = _mask() if with_mask else None
    torch.library.opcheck(torch.ops.llmq.kv_decode_attention.default, _op_args(q, kv, mask),
                          dict(num_splits=2, block_n=16))


def test_fake_impl_shapes():
    """Fake output: shape, dtype and (contiguous) strides of the real output, also for a strided q."""
    kv = _cache(dtype=torch.bfloat16)
    q = torch.randn(2, 1, 4, D).to(torch.bfloat16).transpose(1, 2)[:, :, 0]  # [2, 4, D], strided
    real = kv_decode_attention(q, kv, D ** -0.5, num_splits=2, block_n=16)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake_kv = dataclasses.replace(kv, **{f.name: mode.from_tensor(getattr(kv, f.name))
                                             for f in dataclasses.fields(kv)
                                             if isinstance(getattr(kv, f.name), torch.Tensor)})
        out = kv_decode_attention(mode.from_tensor(q), fake_kv, D ** -0.5, mask=mode.from_tensor(_mask()))
    assert out.shape == real.shape == (2, 4, D)
    assert out.dtype == real.dtype == torch.bfloat16
    assert out.stride() == real.stride()


def _decode_step(query, kv, mask):
    # what llmq.kv.attention.kv_attention_forward does at a decode step: [B, H_q, 1, D] → [B, 1, H_q, D]
    return kv_decode_attention(query[:, :, 0], kv, query.shape[-1] ** -0.5, mask, num_splits=2, block_n=16)[:, None]


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_torch_compile_fullgraph(with_mask, kernel_tol):
    """aot_eager traces the wrapper and the op in one graph and matches eager, as the cache grows.

    The second, longer cache recompiles with dynamic shapes: ``n_quant`` reaches the op as a SymInt.
    """
    compiled = torch.compile(_decode_step, backend="aot_eager", fullgraph=True)
    for n_quant, n_res in [(48, 5), (64, 9)]:
        kv = make_packed_kv(2, 2, n_quant, n_res, D, 4, 16, True, False, torch.float16, spare=16)
        mask = torch.ones(2, n_quant + n_res, dtype=torch.bool) if with_mask else None
        if with_mask:
            mask[1, :20] = False
        query = torch.randn(2, 4, 1, D).half()
        expected = _decode_step(query, kv, mask)
        torch.testing.assert_close(compiled(query, kv, mask), expected, **kernel_tol[torch.float16])
        ref = kv_decode_attention_reference(query[:, :, 0], kv, D ** -0.5, mask)[:, None]
        torch.testing.assert_close(expected, ref, **kernel_tol[torch.float16])


def test_asymmetric_cache_without_zeros_raises():
    kv = dataclasses.replace(_cache(symmetric=False), k_zeros=None)
    with pytest.raises(ValueError, match="asymmetric cache needs k_zeros and v_zeros"):
        kv_decode_attention(torch.randn(2, 4, D).half(), kv, D ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_inductor_cudagraphs(dtype, kernel_tol):
    """Default inductor backend with CUDA graphs (reduce-overhead): replays with new queries match eager."""
    d = 128
    kv = _to_cuda(make_packed_kv(2, 8, 1024, 37, d, 4, 64, True, False, dtype, spare=64))
    mask = torch.ones(2, 1024 + 37, dtype=torch.bool, device="cuda")
    mask[1, :300] = False

    def step(query):
        return kv_decode_attention(query[:, :, 0], kv, d ** -0.5, mask)[:, None]

    from torch._dynamo.utils import counters
    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, record, then replays
        query = torch.randn(2, 32, 1, d, device="cuda").to(dtype)
        out = compiled(query).clone()  # a CUDA-graph output is overwritten by the next replay
        torch.testing.assert_close(out, step(query), **kernel_tol[dtype])
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor skipped CUDA graphs (see its log)"


def test_eager_calls_run_the_plain_launcher(monkeypatch):
    """Outside torch.compile and autograd the wrapper skips the dispatcher (same kernels); fake tensors
    (FakeTensorMode, test_fake_impl_shapes) and inputs that require grad go through the op."""
    import llmq.kernels.kv_attention as kva
    calls = []
    for name in ("kv_decode_attention_op", "kv_decode_attention_launch"):
        real = getattr(kva, name)
        monkeypatch.setattr(kva, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    kv = _cache()
    q = torch.randn(2, 4, D).half()
    plain = kv_decode_attention(q, kv, D ** -0.5, num_splits=2, block_n=16)
    assert calls == ["kv_decode_attention_launch"]
    via_op = kv_decode_attention(q.clone().requires_grad_(), kv, D ** -0.5, num_splits=2, block_n=16)
    assert calls[-1] == "kv_decode_attention_op" and torch.equal(via_op.detach(), plain)
