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
    assert "OK: 64 interpreter runs" in out and "uint8/float zeros" in out


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


@pytest.mark.parametrize("sym, zero_point", [(True, "int"), (False, "float")], ids=["sym", "asym-float-zeros"])
def test_timed_path_runs_end_to_end_on_the_interpreter(bench, monkeypatch, tmp_path, sym, zero_point):
    """The GPU-only code path (every method, the reference checks, the crossover and target summary) run on CPU
    with a counting stand-in for the timer: it must not rot between GPU sessions. No timing is measured."""
    import triton.testing

    calls = []
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "MODELS", {"tiny": [("a", 200, 40)]})
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda device: 1.0)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(fn()) or 1.0)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: calls.append(fn()) or 0.5)
    args = bench.argparse.Namespace(bits=[4], group=64, sym=sym, dtype="fp16", models=["tiny"], ms=[1, 17],
                                    peak_gbs=None, out=str(tmp_path / "rows.json"), zero_point=zero_point)
    rows = bench.bench_cuda(args)
    assert {r["zero_point"] for r in rows} == {None if sym else zero_point}
    assert json.loads((tmp_path / "rows.json").read_text()) == rows  # written as it goes
    assert not [r for r in rows if "error" in r], rows
    methods = {(r["M"], r["method"]) for r in rows}
    assert {(1, "llmq"), (1, "llmq-gemm"), (1, "fp16"), (1, "deq+mm"), (17, "llmq"), (1, "llmq (graph)"),
            (1, "fp16 (graph)")} <= methods
    assert {(17, "llmq-gemm"), (17, "llmq-scratch")} <= methods and len(calls) == len(rows)
    table = bench.measured_crossover(rows, "h200")  # the stand-in timer: every method "takes" 1 ms
    entry = table["devices"]["h200"]["4"]["small"]
    assert entry["source"] == "measured" and entry["scratch_min_m"] == 17 and table["version"] == 1
    bench.summarize_targets(rows)
    bench.print_table(rows)
    bench.plot(rows, str(tmp_path / "p.png"))
