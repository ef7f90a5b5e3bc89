"""scripts/gpu_session.sh, the one-call GPU run: it parses, and its stages can be selected by name."""

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_session.sh"


def test_gpu_session_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_stage_names_are_unique_and_cover_every_issue_benchmark():
    names = re.findall(r"^(?:TAIL=\d+ )?stage (\w+) (\d+) ", SCRIPT.read_text(), flags=re.M)
    stages = [n for n, _ in names]
    assert len(stages) == len(set(stages)), stages
    for needed in ("tests", "bench_kernels_int4", "bench_kv_attention", "bench_moe", "bench_compile", "bench_generate"):
        assert needed in stages
    assert stages[:2] == ["tests", "bench_kernels_int4"], "the weight kernels come first: the call may be cut short"
