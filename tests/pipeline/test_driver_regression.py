"""Every method gives bit for bit the state dict it gave before the one-driver refactor (d3ceb86), through the
public ``llmq.quantize`` and through the deprecated entry point it replaced."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from driver_regression import CASES, RECORDED_WITH_TORCH, compute, expected  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.__version__.startswith(RECORDED_WITH_TORCH + "."),
                                reason=f"hashes recorded with torch {RECORDED_WITH_TORCH}; others may round differently")


@pytest.mark.parametrize("case", CASES)
def test_llmq_quantize_gives_the_recorded_state_dict(case, tmp_path):
    assert compute(case, tmp_path, api="new") == expected(case, "new")


@pytest.mark.parametrize("case", ["rtn-memory", "gptq-memory", "awq-disk", "w8a8-static-sq-disk",
                                  "w8a8-static-sq-memory"])
def test_deprecated_entry_points_give_the_recorded_state_dict(case, tmp_path):
    assert compute(case, tmp_path, api="old") == expected(case, "old")
