"""What happens when a checkpoint is loaded by a process that never imports llmq (documented in the README)."""

import subprocess
import sys

from conftest import make_tiny_llama
from llmq.checkpoint import build_quantization_config, save_quantized
from llmq.model.rtn import quantize_model_rtn
from llmq.recipes import WeightRecipe

SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("LINEAR_TYPE", type(m.model.layers[0].self_attn.q_proj).__name__)
"""


def test_loading_without_import_llmq_is_loud_not_silent(tmp_path):
    model = make_tiny_llama()
    recipe = WeightRecipe(4, 32, False)
    quantize_model_rtn(model, recipe, progress=False)
    out = save_quantized(model, None, tmp_path / "q", build_quantization_config(model, recipe))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:  # transformers versions that refuse unknown methods outright
        assert "llmq" in text
    else:  # transformers 5.x: warns about the unknown method and reports every Linear weight as MISSING
        assert "Unknown quantization type, got llmq" in text
        assert "MISSING" in text and "LINEAR_TYPE Linear" in text
