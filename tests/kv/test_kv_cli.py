"""``llmq generate --kv-bits`` and ``llmq bench`` end to end through subprocesses (tiny model: head_dim 16)."""

import json
import subprocess
import sys


def llmq(*args):
    return subprocess.run([sys.executable, "-m", "llmq.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_generate_with_quantized_kv(tiny_model_dir):
    proc = llmq("generate", tiny_model_dir, "--prompt", "The capital of France is", "--max-new-tokens", 40,
                "--kv-bits", 4, "--kv-group", 16, "--kv-residual", 4, "--kv-key-axis", "channel")
    assert proc.returncode == 0, proc.stderr
    assert "KV cache int4, keys per channel" in proc.stdout
    quantized = int(proc.stdout.split(" quantized)")[0].rsplit("(", 1)[1])
    assert quantized >= 16


def test_generate_bad_kv_settings(tiny_model_dir):
    proc = llmq("generate", tiny_model_dir, "--prompt", "x", "--kv-bits", 3)
    assert proc.returncode == 2 and "invalid choice: 3" in proc.stderr
    proc = llmq("generate", tiny_model_dir, "--prompt", "x", "--kv-bits", 4, "--kv-group", 32)
    assert proc.returncode == 2 and "does not divide the model's head_dim 16" in proc.stderr
    proc = llmq("generate", tiny_model_dir, "--prompt", "x", "--kv-residual", 8)
    assert proc.returncode == 2 and "add --kv-bits" in proc.stderr


def test_bench_writes_json_and_plot(tiny_model_dir, tmp_path):
    proc = llmq("bench", "--model", tiny_model_dir, "--contexts", 40, "--kv", "fp", "4", "--weights", "fp",
                "--new-tokens", 3, "--group", 16, "--residual", 8, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "bench_generate.json").read_text())
    assert (tmp_path / "bench_generate.png").stat().st_size > 0
    runs = {r["kv"]: r for r in report["runs"]}
    assert set(runs) == {"fp", "4"} and all(r["decode_tokens_per_s"] > 0 for r in runs.values())
    assert runs["4"]["kv_bytes"] < runs["fp"]["kv_bytes"]  # fp32 model on CPU: fp cache is 4 bytes/elt
    assert {r["kv"] for r in report["largest_batch"]} == {"fp", "4"}
