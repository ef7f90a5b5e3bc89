"""On a tiny Llama, AWQ, GPTQ and W8A8 + SmoothQuant give bit for bit what they gave before the
architecture maps (commit ea8115a), except where a result changed on purpose (``regression.CHANGED``)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from regression import CASES, CHANGED, EXPECTED, RECORDED_WITH_TORCH, compute  # noqa: E402


@pytest.mark.skipif(not torch.__version__.startswith(RECORDED_WITH_TORCH + "."),
                    reason=f"hashes recorded with torch {RECORDED_WITH_TORCH}; other versions may round differently")
@pytest.mark.parametrize("case", CASES)
def test_same_state_dict_as_before_the_maps(case, tmp_path):
    digest = compute(case, tmp_path)
    if case in CHANGED:
        assert digest != EXPECTED[case], f"{case} was expected to change: {CHANGED[case]}"
    else:
        assert digest == EXPECTED[case]
