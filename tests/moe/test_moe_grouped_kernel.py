"""The grouped MoE kernel (interpreted) against the pure-torch reference, and as a QuantExperts backend."""

import sys
from pathlib import Path

import pytest
import torch

from llmq.kernels.moe_grouped import align_block_size, moe_grouped_matmul, moe_grouped_reference
from llmq.moe.quantize import quantize_experts, rtn_quantizer
from llmq.nn.quant_experts import QuantExpertLinear
from llmq.quant.primitives import quantize_weight

sys.path.insert(0, str(Path(__file__).parents[1]))
from moe_tiny import tiny_moe  # noqa: E402


def test_align_block_size_pads_each_expert_and_skips_idle_ones():
    idx = torch.tensor([[2, 0], [2, 0], [3, 2]])  # expert 1: no tokens
    sorted_pairs, expert_ids = align_block_size(idx, 4, 4)
    assert expert_ids.tolist() == [0, 2, 3, -1, -1, -1]  # cdiv(6, 4) + 4 = 6 blocks, 3 used
    pad = 6
    assert sorted_pairs[:4].tolist() == [1, 3, pad, pad]  # expert 0: pairs 1, 3
    assert sorted_pairs[4:8].tolist() == [0, 2, 5, pad]  # expert 2
    assert sorted_pairs[8:12].tolist() == [4, pad, pad, pad]  # expert 3
    assert (sorted_pairs[12:] == pad).all()


def _stack(e, n, k, bits, group_size, symmetric):
    w = torch.randn(e, n, k)
    return QuantExpertLinear.from_quantized([quantize_weight(w[i], bits, group_size, symmetric) for i in range(e)])


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, False), (4, None, True), (8, 64, True),
                                                         (3, 32, False), (2, 32, True)],
                         ids=["int4-g32-asym", "int4-chan-sym", "int8-g64-sym", "int3-g32-asym", "int2-g32-sym"])
@pytest.mark.parametrize("tokens", [1, 5], ids=["T1", "T5"])
def test_kernel_matches_reference_with_idle_experts(bits, group_size, symmetric, tokens, kernel_tol):
    e, k_in, n = 5, 80, 48  # K=80: a partial group and a partial K block; N=48: a partial column tile
    stack = _stack(e, n, k_in, bits, group_size, symmetric)
    top_k = 2
    idx = torch.randint(0, 3, (tokens, top_k))  # experts 3, 4 never routed
    idx[0, 1] = e  # an expert another rank holds: skipped
    a = torch.randn(tokens, k_in)
    g = stack.in_features if group_size is None else group_size
    sorted_pairs, expert_ids = align_block_size(idx, e, 16)
    out = moe_grouped_matmul(a, stack.qweight, stack.scales, stack.zero_points, sorted_pairs, expert_ids,
                             tokens * top_k, top_k, bits, g, 16)
    ref = moe_grouped_reference(a, stack.qweight, stack.scales, stack.zero_points, idx, top_k, bits, g)
    torch.testing.assert_close(out, ref, **kernel_tol[torch.float32])
    assert torch.equal(out[1], torch.zeros(n))  # the pair routed nowhere


# (bits, group_size, symmetric, K): steps of 16 packed rows (16*P features) inside one group take the
# scale-after-dot path (fp16: the exponent-trick decode); a partial last step and per-channel included
SCALE_AFTER_DOT_CASES = [(4, 128, True, 256), (4, 128, False, 200), (4, None, False, 200), (8, 64, True, 160),
                         (8, None, True, 96), (2, None, False, 300), (4, 64, True, 128)]


@pytest.mark.parametrize("bits, group_size, symmetric, k_in", SCALE_AFTER_DOT_CASES,
                         ids=[f"int{b}-{'chan' if g is None else f'g{g}'}-{'sym' if s else 'asym'}-K{k}"
                              for b, g, s, k in SCALE_AFTER_DOT_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_kernel_paths_match_reference_in_every_dtype(bits, group_size, symmetric, k_in, dtype, kernel_tol):
    from llmq.kernels.moe_grouped import plan

    e, n, tokens, top_k = 4, 40, 3, 2
    stack = _stack(e, n, k_in, bits, group_size, symmetric)
    g = k_in if group_size is None else group_size
    after = plan(1, n, k_in, bits, g, dtype, "none" if symmetric else "int", 16).constexprs["SCALE_AFTER_DOT"]
    step = 16 * {2: 16, 4: 8, 8: 4}[bits]  # features per K step
    assert after == (group_size is None or group_size % step == 0)  # int4 g64 straddles steps: the per-row path
    idx = torch.tensor([[0, 2], [2, 3], [0, 0]])
    a = torch.randn(tokens, k_in).to(dtype)
    sorted_pairs, expert_ids = align_block_size(idx, e, 16)
    scales = stack.scales.to(torch.float16)
    out = moe_grouped_matmul(a, stack.qweight, scales, stack.zero_points, sorted_pairs, expert_ids,
                             tokens * top_k, top_k, bits, g, 16)
    ref = moe_grouped_reference(a, stack.qweight, scales, stack.zero_points, idx, top_k, bits, g)
    torch.testing.assert_close(out, ref, **kernel_tol[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_backend_matches_torch_backend(dtype, kernel_tol):
    experts = tiny_moe("qwen3_moe", num_experts=6).model.layers[0].mlp.experts
    qe = quantize_experts(experts, "experts", rtn_quantizer(4, 32, False)).to(dtype)
    x = torch.randn(3, 64, dtype=dtype)
    idx = torch.tensor([[0, 4], [4, 0], [5, 4]])  # experts 1, 2, 3: 0 tokens
    w = torch.softmax(torch.randn(3, 2), -1).to(dtype)
    ref = qe(x, idx, w)  # torch backend (automatic on CPU)
    qe.set_backend("triton-interpret")
    torch.testing.assert_close(qe(x, idx, w), ref, **kernel_tol[dtype])


def test_forced_triton_on_cpu_is_refused_with_the_reason():
    experts = tiny_moe("mixtral").model.layers[0].mlp.experts
    qe = quantize_experts(experts, "experts", rtn_quantizer(4, 32, False))
    qe.set_backend("triton")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        qe(torch.randn(2, 64), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_backend_on_cuda_matches_torch_backend(dtype, kernel_tol):
    experts = tiny_moe("qwen3_moe", num_experts=8).model.layers[0].mlp.experts
    qe = quantize_experts(experts, "experts", rtn_quantizer(4, 32, True)).to("cuda", dtype)
    x = torch.randn(33, 64, device="cuda", dtype=dtype)
    idx = torch.randint(0, 5, (33, 2), device="cuda")  # experts 5-7 idle
    w = torch.softmax(torch.randn(33, 2, device="cuda"), -1).to(dtype)
    qe.set_backend("torch")
    ref = qe(x, idx, w)
    qe.set_backend(None)  # automatic on CUDA: the grouped kernel
    assert qe.backend_for(x).name == "triton"
    torch.testing.assert_close(qe(x, idx, w), ref, **kernel_tol[dtype])
