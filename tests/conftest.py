"""Shared test setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, at the very top, before llmq (and its kernels) are imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances for kernel-vs-reference comparisons on the *same* quantized weights,
# one row per activation dtype (fp32 accumulation everywhere).
KERNEL_TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}


@pytest.fixture
def kernel_tol():
    """``kernel_tol[dtype]`` → kwargs for ``torch.testing.assert_close``."""
    return KERNEL_TOLERANCES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
