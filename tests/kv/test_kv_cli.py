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


def test_replicated_prefill_fills_the_whole_batch():
    """``run_one(replicate=True)``: one prefilled sequence's cache repeated to the batch holds exactly batch x
    the bytes of one (the cache the largest-batch decode measurement runs on)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmq.kv.bench import run_one

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for kv in ("fp", "4"):
        one = run_one(model, kv, 40, 1, 3, residual=8, group=16)
        many = run_one(model, kv, 40, 3, 3, residual=8, group=16, replicate=True)
        assert many["replicated_prefill"] and many["batch"] == 3
        assert many["kv_bytes"] == 3 * one["kv_bytes"]
