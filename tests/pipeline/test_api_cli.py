"""Calibrated methods through ``llmq.quantize`` and ``llmq quantize``: recorded config, early errors."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_TEXT
from transformers import AutoModelForCausalLM

import llmq
from llmq.calibration import CalibrationSpec
from llmq.recipes import WeightRecipe


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TINY_TEXT * 4)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if quantization work starts."""
    import llmq.pipeline.driver

    monkeypatch.setattr(llmq.pipeline.driver, "run_layerwise", lambda *a, **k: pytest.fail("work started"))


@pytest.mark.parametrize(
    "spec,error,match",
    [
        (CalibrationSpec("missing/calib.txt"), FileNotFoundError, "does not exist"),
        (CalibrationSpec("TOO_SHORT", 4, 512), ValueError, "fewer than one window"),
        (CalibrationSpec("EMPTY", 4, 16), ValueError, "contains no text"),
    ],
    ids=["missing", "too-short", "empty"],
)
def test_calibration_errors_before_any_work(tiny_model_dir, tmp_path, no_work, spec, error, match):
    if spec.source in ("TOO_SHORT", "EMPTY"):
        path = tmp_path / "calib.txt"
        path.write_text("Just a few words." if spec.source == "TOO_SHORT" else "\n \n")
        spec = CalibrationSpec(str(path), spec.nsamples, spec.seqlen)
    with pytest.raises(error, match=match):
        llmq.quantize(tiny_model_dir, WeightRecipe(4, 32, False, method="gptq"), tmp_path / "out",
                      calibration=spec, progress=False)
    assert not (tmp_path / "out").exists()


def test_api_records_method_and_arguments(tiny_model_dir, tmp_path, calib_file):
    recipe = WeightRecipe(4, 32, False, method="awq", method_args={"n_grid": 10})
    result = llmq.quantize(tiny_model_dir, recipe, tmp_path / "q", calibration=CalibrationSpec(str(calib_file), 4, 16),
                           progress=False)
    cfg = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]["weight"]
    assert cfg["method"] == "awq"
    assert cfg["method_args"]["n_grid"] == 10 and cfg["method_args"]["clip"] is True  # defaults filled in
    assert cfg["method_args"]["calibration"] == {"source": str(calib_file), "nsamples": 4, "seqlen": 16, "seed": 0}
    loaded = AutoModelForCausalLM.from_pretrained(result.out_dir)
    x = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, result.model(x).logits)


def test_cli_gptq_end_to_end(tiny_model_dir, tmp_path, calib_file):
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "llmq.cli.main", "quantize", str(tiny_model_dir), "--out", str(out), "--bits", "3",
           "--group", "32", "--method", "gptq", "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "16",
           "--method-arg", "act_order=false", "--max-memory", "4GB", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["linears"] == 14
    weight = json.loads((out / "config.json").read_text())["quantization_config"]["weight"]
    assert weight["method"] == "gptq" and weight["method_args"]["act_order"] is False
    assert weight["method_args"]["calibration"]["nsamples"] == 4


def test_cli_missing_calibration_file(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "llmq.cli.main", "quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"),
           "--method", "awq", "--calib", str(tmp_path / "nope.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not (tmp_path / "q").exists()
