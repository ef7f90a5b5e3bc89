"""The middle-range fused GEMM on the fp16x2 path (``kernels/dequant_gemm_f16x2.py``): fp16 activations and
scales, 2/3/4/8 bits, every zero kind, the weight as the register operand of a swapped dot.

Under the interpreter the plain-Triton twin of the inline assembly runs (``ASM = False``; its bit-exactness
against a model of the PTX is ``test_dequant_f16x2.py``'s). Checked here: the launcher takes the path for
fp16 (and not for bf16 / fp32 / fp32 scales), and the GEMM matches the fp32 reference on awkward shapes:
M = 17 / 127 / 128 / 129, K not a multiple of the tile or of the group, N not a multiple of the block.
"""

import pytest
import torch
from layer_helpers import make_layer
from llmq.kernels import dequant_gemm
from llmq.kernels.dequant_gemm import dequant_gemm_launch
from llmq.kernels.dequant_tile import dequant_matmul_reference, repack_tiled


@pytest.mark.parametrize("k,n", [(300, 70), (520, 130)], ids=["K300-N70", "K520-N130"])
@pytest.mark.parametrize("m", [17, 127, 128, 129], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("group", [32, 128, None], ids=lambda g: "perchannel" if g is None else f"g{g}")
@pytest.mark.parametrize("kind", ["none", "int", "float"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_f16x2_gemm_matches_reference(bits, kind, group, m, k, n, kernel_tol):
    if m in (127, 128) and (group != 128 or k != 520):  # the M edge cases once per bits x kind
        pytest.skip("M = 127 / 128 run at g128, K = 520")
    layer = make_layer(k, n, bits, group, kind)
    pl = dequant_gemm.plan(m, n, k, bits, layer.effective_group_size, layer.scales.shape[0], torch.float16,
                           layer.zero_points is not None, True)
    assert pl.path == "f16x2" and not pl.constexprs["ASM"]
    x = torch.randn(m, k).half()
    tiled = repack_tiled(layer.qweight, bits, k)
    args = (layer.scales, layer.zero_points, layer.bias, bits, layer.effective_group_size, k)
    y = dequant_gemm_launch(x, tiled, *args)
    ref = dequant_matmul_reference(x, layer.qweight, *args)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    torch.testing.assert_close(y, ref, **kernel_tol[torch.float16])


def test_path_choice():
    """fp16 activations with fp16 scales take the f16x2 GEMM at every bit width; the rest the fp32 dequantization."""
    for bits in (2, 3, 4, 8):
        assert dequant_gemm.plan(64, 256, 4096, bits, 128, 32, torch.float16, False, False).path == "f16x2"
    assert dequant_gemm.plan(64, 256, 4096, 4, 128, 32, torch.bfloat16, False, False).path != "f16x2"
    assert dequant_gemm.plan(64, 256, 4096, 4, 128, 32, torch.float32, False, False).path == "dot-fp32"
    assert dequant_gemm.plan(64, 256, 4096, 4, 128, 32, torch.float16, False, False,
                             scale_dtype=torch.float32).path == "dot"
