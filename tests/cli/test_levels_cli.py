"""``llmq quantize --levels``: defaults, refusals (one line naming the fix, exit 2), and a GPTQ run."""

import json

import pytest

from llmq.cli.main import main


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,phrase", [
    (["--levels", "nf", "--asym"], "drop --asym"),
    (["--bits", "1"], "add --levels binary"),
    (["--levels", "kmeans", "--bits", "8"], "takes --bits 2 or 3 or 4"),
    (["--levels", "binary", "--bits", "2"], "takes --bits 1"),
    (["--levels", "nf", "--method", "awq"], "uniform grid only"),
    (["--levels", "nf", "--method", "smoothquant"], "--levels does not apply to --method smoothquant"),
    (["--levels", "nf", "--method-arg", "clip=percentile"], "clip='mse'"),
], ids=["asym", "1bit-uniform", "kmeans-8bit", "binary-2bit", "awq", "w8a8", "rtn-percentile"])
def test_nonsense_combinations_are_refused_before_any_work(args, phrase, tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "quantize", tiny_model_dir, "--out", tmp_path / "q", *args)
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_binary_defaults_to_one_bit_and_symmetric(tiny_model_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "quantize", tiny_model_dir, "--levels", "binary", "--group", 32,
                           "--out", tmp_path / "b", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["recipe"]["levels"] == "binary" and summary["recipe"]["bits"] == 1
    assert summary["recipe"]["symmetric"] is True and 1 < summary["bits_per_weight"] < 1.6


def test_gptq_kmeans_checkpoint_inspects_as_kmeans(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "k"
    code, _, _ = run_cli(capsys, "quantize", tiny_model_dir, "--levels", "kmeans", "--bits", 3, "--group", "channel",
                         "--method", "gptq", "--nsamples", 4, "--seqlen", 32, "--out", out, "--json")
    assert code == 0
    info = json.loads(run_cli(capsys, "inspect", out, "--json")[1])
    assert info["recipe"]["levels"] == "kmeans" and info["recipe"]["method_args"]["refit"] is True
    assert {m["levels"] for m in info["modules"]} == {"kmeans"}
