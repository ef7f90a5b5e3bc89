"""The ``llmq`` command line, end to end through subprocesses (as a user runs it)."""

import json
import os
import subprocess
import sys

import pytest

from llmq.cli.main import SUBCOMMANDS


def llmq(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "llmq.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=None if env is None else {**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"llmq {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command):
    out = llmq(command, "--help").stdout
    assert f"usage: llmq {command}" in out and "--help" in out


def test_quantize_inspect_generate_eval(tiny_model_dir, tmp_path):
    out = tmp_path / "w4"
    res = llmq("quantize", tiny_model_dir, "--bits", 4, "--group", 32, "--sym", "--out", out, "--json")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["linears"] == 14 and summary["recipe"]["symmetric"] is True
    assert 4 < summary["bits_per_weight"] < 5

    info = json.loads(llmq("inspect", out, "--json").stdout)
    assert info["quant_method"] == "llmq" and len(info["modules"]) == 14
    assert {m["bits"] for m in info["modules"]} == {4}

    gen = llmq("generate", out, "--prompt", "The capital of France is", "--max-new-tokens", 5).stdout
    assert gen.startswith("The capital of France is") and "[5 tokens in" in gen

    q = json.loads(llmq("eval", out, "--ppl", "--tokens", 200, "--window", 64, "--text",
                        _text_file(tmp_path), "--json").stdout)
    fp = json.loads(llmq("eval", tiny_model_dir, "--ppl", "--tokens", 200, "--window", 64, "--text",
                         _text_file(tmp_path), "--json").stdout)
    assert q["tokens"] == fp["tokens"] > 64
    assert q["perplexity"] > 1 and fp["perplexity"] > 1 and q["perplexity"] != fp["perplexity"]


def _text_file(tmp_path):
    from conftest import TINY_TEXT

    path = tmp_path / "text.txt"
    path.write_text(TINY_TEXT * 3)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "5"], "invalid choice: 5"),
        (["--group", "100"], "unsupported group size 100: choose one of 32, 64, 128, 256 or 'channel'"),
        (["--group", "big"], "group must be one of"),
        (["--method", "gptq", "--zero-point", "float"], "zero_point='float' is produced by ['hqq'] only"),
        (["--method", "hqq", "--sym", "--zero-point", "float"], "symmetric recipes store no zero point"),
    ],
    ids=["bits", "group", "group-word", "float-zero-gptq", "float-zero-sym"],
)
def test_bad_recipe_arguments(tiny_model_dir, tmp_path, args, message):
    res = llmq("quantize", tiny_model_dir, "--out", tmp_path / "o", *args, check=False)
    assert res.returncode == 2 and message in res.stderr
    assert not (tmp_path / "o").exists()


def test_missing_model_path(tmp_path):
    res = llmq("quantize", tmp_path / "does-not-exist", "--out", tmp_path / "o", check=False)
    assert res.returncode == 2 and "not found: no such folder" in res.stderr
    assert "Traceback" not in res.stderr


def test_hub_id_offline_gives_clear_error(tmp_path):
    res = llmq("quantize", "some-org/some-model", "--out", tmp_path / "o", check=False, env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and "could not be fetched from the Hugging Face hub" in res.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tiny_model_dir, tmp_path):
    """An earlier output (a model folder) is replaced with --force only; see test_errors.py for
    folders that are not model folders, which --force refuses."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "keep.txt").write_text("precious")
    res = llmq("quantize", tiny_model_dir, "--out", out, check=False)
    assert res.returncode == 2 and "pass --force" in res.stderr
    assert (out / "keep.txt").read_text() == "precious"
    llmq("quantize", tiny_model_dir, "--out", out, "--force", "--json")
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_eval_missing_text_file(tiny_model_dir, tmp_path):
    res = llmq("eval", tiny_model_dir, "--ppl", "--text", tmp_path / "nope.txt", check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_closed_output_pipe_stops_quietly(tiny_model_dir, tmp_path):
    """`llmq inspect DIR | head -1`: when the reader has gone, llmq exits with 141 (SIGPIPE's status) and no
    traceback."""
    out = tmp_path / "q"
    llmq("quantize", tiny_model_dir, "--out", out)
    proc = subprocess.Popen([sys.executable, "-m", "llmq.cli.main", "inspect", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before llmq writes a line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()
