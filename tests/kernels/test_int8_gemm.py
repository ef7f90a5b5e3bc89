"""Triton int8 GEMM vs the pure-torch reference (int8 dots are exact under the interpreter)."""

import pytest
import torch

from llmq.kernels.aot import TARGETS
from llmq.kernels.int8_gemm import GPU_CONFIGS, int8_gemm, int8_gemm_reference, int32_matmul_reference

from _w8a8_aot import aot_usage  # tests/kernels is on sys.path (rootdir-relative test modules)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (M, K, N): M = 1 (decode), tile edges 31/32/33, K not a multiple of BLOCK_K, odd N
SHAPES = [(1, 64, 48), (3, 100, 33), (33, 128, 64), (17, 129, 127), (64, 576, 96)]


def rand_int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def make(m, k, n, per_tensor=False):
    a, w = rand_int8(m, k), rand_int8(n, k)
    a_scale = torch.rand(1 if per_tensor else m) * 0.02 + 1e-3
    w_scale = torch.rand(n) * 0.01 + 1e-4
    return a, w, a_scale, w_scale


def test_int32_reference_exact_at_extremes():
    # every product -128 * -128: the worst case the accumulator must hold exactly
    a = torch.full((2, 4096), -128, dtype=torch.int8)
    w = torch.full((3, 4096), -128, dtype=torch.int8)
    assert (int32_matmul_reference(a, w) == 4096 * 16384).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, kernel_tol):
    m, k, n = shape
    a, w, a_scale, w_scale = make(m, k, n)
    bias = torch.randn(n).to(dtype)
    y = int8_gemm(a, w, a_scale, w_scale, bias, out_dtype=dtype)
    ref = int8_gemm_reference(a, w, a_scale, w_scale, bias, out_dtype=dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    if dtype == torch.float32:
        assert torch.equal(y, ref)  # same int32 sums, same fp32 epilogue order
    else:
        torch.testing.assert_close(y, ref, **kernel_tol[dtype])


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_per_tensor_scale_and_no_bias(bias):
    a, w, a_scale, w_scale = make(20, 96, 40, per_tensor=True)
    b = torch.randn(40) if bias else None
    y = int8_gemm(a, w, a_scale, w_scale, b, out_dtype=torch.float32)
    assert torch.equal(y, int8_gemm_reference(a, w, a_scale, w_scale, b, out_dtype=torch.float32))


def test_transposed_weight_view():
    # w given as a transposed view of a [K, N] tensor: strides handle the layout
    a, w, a_scale, w_scale = make(9, 64, 48)
    w_t = w.t().contiguous().t()
    y = int8_gemm(a, w_t, a_scale, w_scale, out_dtype=torch.float32)
    assert torch.equal(y, int8_gemm_reference(a, w, a_scale, w_scale, out_dtype=torch.float32))


def test_empty_m():
    a, w, a_scale, w_scale = make(0, 32, 16)
    assert int8_gemm(a, w, torch.ones(1), w_scale).shape == (0, 16)


@pytest.mark.parametrize("kw, match", [
    (dict(a=torch.zeros(2, 8)), "must be int8"),
    (dict(w=rand_int8(4, 9)), "same K"),
    (dict(a_scale=torch.ones(3)), "a_scale must be float32 with 2"),
    (dict(w_scale=torch.ones(4, dtype=torch.float16)), "w_scale must be float32"),
    (dict(bias=torch.ones(5)), "bias must be"),
    (dict(out_dtype=torch.int32), "out_dtype"),
], ids=["float-a", "k-mismatch", "a-scale", "w-scale", "bias", "out-dtype"])
def test_bad_input(kw, match):
    args = dict(a=rand_int8(2, 8), w=rand_int8(4, 8), a_scale=torch.ones(2), w_scale=torch.ones(4))
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        int8_gemm(**args)


def aot_cases(targets, configs, outs=("*fp16", "*bf16")):
    cases = []
    for cap in targets:
        for bm, bn, bk, warps, stages in configs:
            for out in outs:
                sig = {"a_ptr": "*i8", "w_ptr": "*i8", "y_ptr": out, "a_scale_ptr": "*fp32",
                       "w_scale_ptr": "*fp32", "bias_ptr": out, "M": "i32", "N": "i32", "K": "i32",
                       "stride_am": "i32", "stride_ak": "constexpr", "stride_wn": "i32", "stride_wk": "constexpr",
                       "stride_ym": "i32", "stride_yn": "constexpr", "stride_as": "i32", "HAS_BIAS": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                       "GROUP_M": "constexpr"}
                # contiguous operands: unit strides are specialized to constexpr 1 by the JIT
                const = {"stride_ak": 1, "stride_wk": 1, "stride_yn": 1, "HAS_BIAS": True,
                         "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
                aligned = ["a_ptr", "w_ptr", "y_ptr", "a_scale_ptr", "w_scale_ptr", "bias_ptr",
                           "K", "N", "stride_am", "stride_wn", "stride_ym"]
                cases.append((sig, const, cap, warps, stages, aligned))
    return cases


def test_aot_compiles_without_spills():
    # every GPU autotune config of each target (sm_80, sm_90a), fp16 and bf16 output
    # (bf16 output only for the first config: the epilogue cast is the only difference)
    cases = [c for _, cap in TARGETS for c in aot_cases([cap], GPU_CONFIGS[cap], ("*fp16",))]
    cases += [c for _, cap in TARGETS for c in aot_cases([cap], GPU_CONFIGS[cap][:1], ("*bf16",))]
    for case, usage in zip(cases, aot_usage("llmq.kernels.int8_gemm", "_int8_gemm_kernel", cases)):
        assert usage["local_bytes"] == 0 and usage["stack_bytes"] == 0, (case[1], case[2], usage)
        assert usage["shared_bytes"] <= 227 * 1024, (case[1], usage)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_matches_reference(dtype, kernel_tol):
    a, w, a_scale, w_scale = (t.cuda() for t in make(1024, 576, 1536))
    y = int8_gemm(a, w, a_scale, w_scale, out_dtype=dtype)
    torch.testing.assert_close(y, int8_gemm_reference(a, w, a_scale, w_scale, out_dtype=dtype), **kernel_tol[dtype])
