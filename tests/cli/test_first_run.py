"""What a newcomer meets first (issue 20): fast ``--help``, progress with ``--json``, the demo and the
README in sequence, ``inspect``'s report, ``bench`` on the CPU, ``quantize --json``, file modes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_TEXT, make_tiny_llama, save_model_dir
from llmq.cli.main import SUBCOMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "triton", "llmq.kv", "llmq.nn")

PROBE = """
import runpy, sys
sys.argv = ["llmq", *sys.argv[1:]]
try:
    runpy.run_module("llmq.cli.main", run_name="__main__")
except SystemExit:
    pass
print("HEAVY", [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
"""


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_imports_neither_torch_nor_transformers(command):
    """`llmq --help` and every `llmq CMD --help` build their parsers from light modules only
    (torch + transformers cost seconds of CPU; the imports are inside the command functions)."""
    args = [command, "--help"] if command else ["--help"]
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert "usage: llmq" in proc.stdout
    assert "HEAVY []" in proc.stderr, proc.stderr


def test_import_llmq_is_light_and_still_registers_with_transformers():
    code = ("import importlib.util, sys, llmq\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "assert importlib.util.find_spec('transformers')  # an availability check, as other libraries do\n"
            "from transformers import AutoModelForCausalLM\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
            "assert 'llmq' in AUTO_QUANTIZER_MAPPING and 'llmq' in AUTO_QUANTIZATION_CONFIG_MAPPING\n"
            "assert llmq.WeightRecipe(bits=4).bits == 4 and llmq.QuantLinear.__name__ == 'QuantLinear'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_every_bench_option_has_help():
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    missing = [a.option_strings for a in bench._actions if a.option_strings and not a.help]
    assert missing == []


def test_export_formats_match_the_writers():
    from llmq.checkpoint.export import EXPORT_FORMATS
    from llmq.cli.export import FORMATS

    assert tuple(EXPORT_FORMATS) == FORMATS


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TINY_TEXT * 3)
    return path


def test_progress_on_stderr_with_json(tiny_model_dir, tmp_path):
    """`--json` keeps stdout one JSON object and still shows progress on stderr."""
    for bar, args in (("perplexity: ", ["eval", tiny_model_dir, "--ppl", "--tokens", 200, "--window", 64, "--text",
                                        _text(tmp_path)]),
                      ("quantize (rtn): ", ["quantize", tiny_model_dir, "--out", tmp_path / "q"])):
        proc = subprocess.run([sys.executable, "-m", "llmq.cli.main", *map(str, args), "--json"],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        json.loads(proc.stdout)  # exactly one JSON document
        assert re.search(re.escape(bar) + r".*\d+/\d+ \[", proc.stderr), proc.stderr  # llmq's own tqdm bar


def test_quantize_json_prints_the_resolved_method_args(tiny_model_dir, tmp_path, capsys):
    text = _text(tmp_path)
    out = tmp_path / "g"
    assert main(["quantize", str(tiny_model_dir), "--out", str(out), "--method", "gptq", "--calib", str(text),
                 "--nsamples", "2", "--seqlen", "16", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["recipe"]["method_args"]
    recorded = json.loads((out / "config.json").read_text())["quantization_config"]["weight"]["method_args"]
    assert printed == recorded and "percdamp" in printed and printed["calibration"]["nsamples"] == 2


def test_written_files_share_ordinary_modes(tiny_model_dir, tmp_path, capsys):
    mask = os.umask(0o022)
    try:
        assert main(["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q")]) == 0
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "q").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "q").stat().st_mode & 0o777 == 0o755


def test_readme_steps_work_after_the_demo():
    """The demo writes its own folder; the README's step-by-step commands (no --force) write others."""
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    demo_out = re.search(r"OUT=\$\{OUT:-([^}]+)\}", demo).group(1)
    readme_outs = re.findall(r"^llmq quantize .*--out (\S+)", (ROOT / "README.md").read_text(), re.M)
    assert readme_outs and demo_out not in readme_outs


def test_demo_prints_the_change_against_fp32(tmp_path):
    """The demo's last step compares the two `eval --json` lines (run here on two made-up results)."""
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    snippet = re.search(r"<<'PY'\n(.*?)\nPY", demo, re.S).group(1)
    q, f = json.dumps({"perplexity": 21.0, "tokens": 9}), json.dumps({"perplexity": 20.0, "tokens": 9})
    out = subprocess.run([sys.executable, "-c", snippet, q, f], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "perplexity int4 g128 21.000 vs fp32 20.000: +1.000 (+5.0%)"


@pytest.fixture(scope="module")
def eleven_layer_checkpoint(tmp_path_factory):
    from llmq.api import quantize
    from llmq.recipes import WeightRecipe

    tmp = tmp_path_factory.mktemp("inspect")
    model = make_tiny_llama(layers=11)
    model.config.tie_word_embeddings = False
    folder = save_model_dir(model, tmp / "fp")
    quantize(folder, WeightRecipe(bits=4, group_size=32), tmp / "q", progress=False)
    return tmp / "q"


def test_inspect_model_order_float_parts_and_total_size(eleven_layer_checkpoint, capsys):
    ckpt = eleven_layer_checkpoint
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = [m["name"] for m in info["modules"]]
    assert names.index("model.layers.2.self_attn.q_proj") < names.index("model.layers.10.self_attn.q_proj")
    assert names[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert names[4:7] == [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    floats = {t["name"]: t for t in info["unquantized"]}
    assert list(floats) == ["model.embed_tokens.weight", "lm_head.weight"]
    assert floats["lm_head.weight"]["bytes"] == 320 * 64 * 4 and floats["lm_head.weight"]["shape"] == [320, 64]
    assert info["file_bytes"] == sum(p.stat().st_size for p in ckpt.iterdir())
    assert info["total_bytes"] == (info["quantized_bytes"] + sum(t["bytes"] for t in info["unquantized"])
                                   + info["other_float_tensors"]["bytes"])
    assert main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "kept in float:" in text and "lm_head.weight" in text and "on disk" in text


def test_bench_on_cpu_caps_the_batch_and_explains_the_window(tiny_model_dir, tmp_path, capsys):
    """Contexts inside the --residual window quantize nothing, and the report says why; the computed
    largest batch never exceeds --max-batch; the device is named."""
    from llmq.kv.bench import cpu_name

    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_model_dir), "--contexts", "16", "--kv", "fp", "4", "--weights", "fp",
                 "--new-tokens", "1", "--group", "16", "--max-batch", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "bench_generate.json").read_text())
    assert [r["largest_batch"] for r in report["largest_batch"]] == [3, 3]
    assert "capped at --max-batch 3" in report["largest_batch"][0]["how"]
    assert "inside the quantized caches' full-precision window (--residual 128)" in text
    assert cpu_name() in report["device"] and "unknown" not in report["device"]
