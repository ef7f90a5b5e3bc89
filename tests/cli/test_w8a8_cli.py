"""``llmq quantize --method smoothquant`` end to end through subprocesses, on the tiny random Llama."""

import json
import subprocess
import sys

import pytest


def llmq(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "llmq.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"llmq {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_smoothquant_static_quantize_inspect_eval(tiny_model_dir, tmp_path):
    out = tmp_path / "w8a8"
    res = llmq("quantize", tiny_model_dir, "--method", "smoothquant", "--act-bits", 8, "--act-scheme", "static",
               "--observer", "percentile", "--alpha", 0.6, "--calib-samples", 2, "--out", out, "--json")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["linears"] == 14 and summary["smoothed"] == 14 and summary["observer"] == "percentile"
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["activation"]["scheme"] == "static" and cfg["activation"]["smoothquant_alpha"] == 0.6
    assert {m["kind"] for m in cfg["modules"].values()} == {"w8a8_linear"}

    info = json.loads(llmq("inspect", out, "--json").stdout)
    assert len(info["modules"]) == 14

    text = tmp_path / "t.txt"
    from conftest import TINY_TEXT

    text.write_text(TINY_TEXT * 3)
    q = json.loads(llmq("eval", out, "--ppl", "--tokens", 200, "--window", 64, "--text", text, "--json").stdout)
    assert q["perplexity"] > 1 and q["tokens"] > 64


@pytest.mark.parametrize("args, message", [
    (["--observer", "kl"], "observer 'kl' calibrates static scales"),
    (["--alpha", "2"], "alpha must be in [0, 1]"),
    (["--bits", "4", "--group", "32"], "do not apply to --method smoothquant"),
], ids=["kl-dynamic", "alpha", "bits"])
def test_bad_w8a8_arguments(tiny_model_dir, tmp_path, args, message, capsys):
    # in-process (the subprocess path is covered above): errors come before the model is loaded
    from llmq.cli.main import main

    assert main(["quantize", str(tiny_model_dir), "--method", "smoothquant", "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("scheme, observer, alpha", [("dynamic", "minmax", 0.5), ("static", "percentile", 0.9)])
def test_scheme_defaults(scheme, observer, alpha):
    """Without --observer/--alpha each scheme gets its held-out-chosen defaults (docs/w8a8.md);
    '--alpha none' still turns smoothing off."""
    from llmq.cli.main import build_parser
    from llmq.cli.quantize import build_activation_recipe

    base = ["quantize", "m", "--method", "smoothquant", "--act-scheme", scheme, "--out", "o"]
    recipe = build_activation_recipe(build_parser().parse_args(base))
    assert (recipe.observer.value, recipe.smoothquant_alpha) == (observer, alpha)
    assert recipe.percentile == 99.9999
    assert build_activation_recipe(build_parser().parse_args(base + ["--alpha", "none"])).smoothquant_alpha is None
