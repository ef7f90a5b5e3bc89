"""scripts/qat_finetune.py end to end on a tiny random Llama (2 steps): report, JSON, plot, checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq  # noqa: F401  (registers the checkpoint format for from_pretrained)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "qat_finetune.py"


@pytest.mark.parametrize("levels, bits", [("uniform", "4"), ("binary", "1")])
def test_qat_script_trains_reports_and_saves(tiny_model_dir, tmp_path, levels, bits):
    out, record = tmp_path / "qat", tmp_path / "qat.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--bits", bits, "--group", "32",
         "--levels", levels, "--steps", "2", "--batch-size", "2", "--seqlen", "16", "--tokens", "96", "--threads", "1",
         "--json", str(record), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| qat |" in proc.stdout and "QAT recovers" in proc.stdout
    data = json.loads(record.read_text())
    assert set(data["perplexity"]) == {"fp32", "rtn", "qat"} and len(data["losses"]) == 2
    assert data["levels"] == levels and data["symmetric"] == (levels != "uniform")
    assert record.with_suffix(".png").stat().st_size > 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["weight"]
    assert cfg["method"] == "qat" and cfg["method_args"]["steps"] == 2 and cfg.get("levels", "uniform") == levels
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 320, (1, 8))).logits).all()
