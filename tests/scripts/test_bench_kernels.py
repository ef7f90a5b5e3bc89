"""scripts/bench_kernels.py: the CPU path (interpreter correctness check) and the report plumbing."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path runs only without CUDA")
def test_cpu_run_checks_correctness_and_reports_no_timings(bench, capsys):
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "CORRECTNESS ONLY" in out and "no timings" in out
    assert "OK: 32 interpreter runs" in out


def test_table_json_and_plot_from_rows(bench, tmp_path, capsys):
    """Formatting only, on hand-made rows (no timing is produced or claimed here)."""
    rows = [dict(device="dev", bits=4, group=128, dtype="fp16", model="m", layer="l", K=8, N=8, M=m, method=meth,
                 regime="gemv", ms=t, tflops=0.0, gbs=0.0, pct_bw=0.0)
            for m in (1, 2) for meth, t in (("fp16", 2.0), ("llmq", 1.0))]
    bench.print_table(rows)
    assert "2.00x" in capsys.readouterr().out
    bench.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
    json.dumps(rows)
