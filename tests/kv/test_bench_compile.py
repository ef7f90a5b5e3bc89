"""``llmq bench --compile`` on CPU: a tiny model, every compiled decode one graph, no recompile."""

import json
import shutil

import pytest

from llmq.cli.main import main as cli_main


def _bench(model_dir, out, *extra):
    return cli_main(["bench", "--compile", "--model", str(model_dir), "--contexts", "40", "--new-tokens", "20",
                     "--group", "16", "--residual", "8", "--memory-budget-gb", "1", "--out", str(out), *extra])


def test_bench_compile_cpu(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = _bench(tiny_model_dir, out, "--kv", "fp", "4", "2", "--weights", "fp", "--compile-backend", "eager")
    assert rc == 0
    report = json.loads((out / "bench_compile.json").read_text())
    assert (out / "bench_compile.png").stat().st_size > 0
    compiled = [r for r in report["runs"] if r["mode"] == "compile"]
    assert [r["kv"] for r in compiled] == ["fp", "4", "2"]
    for r in compiled:
        assert (r["graphs"], r["graph_breaks"], r["recompiles_while_timed"]) == (1, 0, 0), r
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    eager = [r for r in report["runs"] if r["mode"] == "eager"]
    assert [(r["kv"], r["context"]) for r in eager] == [("fp", 40)]
    # 40 + 20 tokens with residual 8, group 16: the quantized caches flushed during the timed steps
    by_kv = {r["kv"]: r for r in compiled}
    assert by_kv["4"]["kv_bytes_used"] < by_kv["4"]["kv_bytes_allocated"]
    assert by_kv["2"]["kv_bytes_allocated"] < by_kv["4"]["kv_bytes_allocated"] < by_kv["fp"]["kv_bytes_allocated"]
    largest = {r["kv"]: r["largest_batch"] for r in report["largest_batch"]}
    assert largest["2"] > largest["4"] > largest["fp"] > 0
    assert "| 4 | 40 |" in capsys.readouterr().out


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor on the CPU compiles C++: no C++ compiler on this machine")
def test_bench_compile_int4_weights(tiny_model_dir, tmp_path):
    """The default backend (inductor) on int4 weights: the cpu backend's kernel lowers into one graph."""
    out = tmp_path / "bench"
    assert _bench(tiny_model_dir, out, "--kv", "fp", "4", "--weights", "int4", "--no-batch-search") == 0
    report = json.loads((out / "bench_compile.json").read_text())
    assert report["backend"] == "inductor"
    compiled = [r for r in report["runs"] if r["mode"] == "compile"]
    assert [r["kv"] for r in compiled] == ["fp", "4"]
    for r in compiled:
        assert (r["weights"], r["graphs"], r["graph_breaks"], r["recompiles_while_timed"]) == ("int4", 1, 0, 0)
