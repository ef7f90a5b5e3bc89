"""The one layer-wise driver (llmq.pipeline.driver), the one entry point (llmq.quantize), the one sampler."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, save_model_dir

import llmq
from llmq.calibration import CalibrationSpec, calibration_batch
from llmq.cli.main import main
from llmq.nn.quant_linear import QuantLinear
from llmq.nn.w8a8_linear import W8A8Linear
from llmq.pipeline.driver import LayerCounts, run_layerwise
from llmq.recipes import ActivationRecipe, WeightRecipe

sys.path.insert(0, str(Path(__file__).parent))

DYNAMIC = ActivationRecipe(scheme="dynamic", smoothquant_alpha=None)


class Recorder:
    """A minimal layer quantizer: records what the driver hands it and swaps nothing."""

    needs_calibration = True
    desc = "record"

    def __init__(self):
        self.selection = WeightRecipe()
        self.seen: list[tuple[str, int, bool, bool]] = []

    def check(self, layers, prefix):
        assert all(p.is_meta for p in layers.parameters())  # from a folder: before any layer is read

    def memory_mb(self, config, layers, decoder_numel, ids, batch_size):
        return {"calibration activations": 0.0}

    def quantize_layer(self, layer, prefix, inputs, device, advance):
        assert not any(p.is_meta for p in layer.parameters())
        self.seen.append((prefix, len(inputs.hidden), advance, inputs.hidden[0].shape == (2, 12, 64)))
        return LayerCounts(linears=1, params=10)

    def summary_fields(self):
        return {}


def test_a_layer_quantizer_gets_each_layer_once_with_its_inputs(tiny_model_dir):
    rec = Recorder()
    ids = torch.randint(0, 320, (4, 12), generator=torch.Generator().manual_seed(0))
    model, summary = run_layerwise(tiny_model_dir, rec, ids, device="cpu", batch_size=2, progress=False)
    assert rec.seen == [("model.layers.0", 2, True, True), ("model.layers.1", 2, False, True)]
    assert summary.linears == 2 and summary.quantized_params == 20 and summary.calibration_samples == 4
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("recipe, module", [(WeightRecipe(4, 32), QuantLinear), (DYNAMIC, W8A8Linear)],
                         ids=["weight", "w8a8"])
def test_llmq_quantize_takes_a_folder_or_a_model_and_either_recipe(recipe, module, tiny_model_dir, tmp_path):
    saved = llmq.quantize(tiny_model_dir, recipe, tmp_path / "q", device="cpu", progress=False)
    in_memory = llmq.quantize(make_tiny_llama(), recipe, device="cpu", progress=False)
    for result in (saved, in_memory):
        assert sum(isinstance(m, module) for m in result.model.modules()) == 14 and result.summary.linears == 14
    assert (tmp_path / "q" / "config.json").is_file() and in_memory.tokenizer is None and in_memory.out_dir is None
    w8a8 = isinstance(recipe, ActivationRecipe)
    assert (saved.summary.scheme == "dynamic") is w8a8 and (saved.activation is recipe) is w8a8
    assert ("W8A8 dynamic" in str(saved.summary)) is w8a8


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(recipe=WeightRecipe(4, 32), out_dir="x"), "out_dir needs the model's folder"),
    (dict(recipe=WeightRecipe(4, 32, method="gptq")), "on a model in memory needs calibration_ids"),
    (dict(recipe=WeightRecipe(4, 32), exclude=("*mlp*",)), "exclude and backend apply to W8A8"),
    (dict(recipe=DYNAMIC, lm_head="int8"), "W8A8 keeps the output head in float"),
    (dict(recipe=WeightRecipe(4, 32, method="hqq", method_args={"percdamp": 0.1})), "unknown hqq arguments"),
    (dict(recipe=WeightRecipe(4, 32), max_memory_mb=100), "this model is already in memory"),
], ids=["out-dir", "no-ids", "exclude", "lm-head", "unknown-arg", "max-memory"])
def test_llmq_quantize_refuses_before_any_work(kwargs, phrase):
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=phrase):
        llmq.quantize(model, device="cpu", progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_refuses_a_method_arg_the_method_does_not_read(tiny_model_dir, tmp_path, capsys):
    code = main(["quantize", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--method", "hqq",
                 "--method-arg", "percdamp=0.1"])
    assert code == 2 and "unknown hqq arguments ['percdamp']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _old_entry_points(folder):
    from llmq.model.rtn import quantize_model_rtn
    from llmq.pipeline import quantize_layerwise, quantize_model
    from llmq.w8a8 import calibration_batches, quantize_layerwise_w8a8, quantize_model_w8a8, quantize_w8a8

    rtn = WeightRecipe(4, 32)
    return {
        "quantize_model_rtn": lambda: quantize_model_rtn(make_tiny_llama(), rtn, progress=False),
        "quantize_model": lambda: quantize_model(make_tiny_llama(), rtn, device="cpu", progress=False),
        "quantize_layerwise": lambda: quantize_layerwise(folder, rtn, device="cpu", progress=False),
        "quantize_w8a8": lambda: quantize_w8a8(folder, DYNAMIC, device="cpu", progress=False),
        "quantize_layerwise_w8a8": lambda: quantize_layerwise_w8a8(folder, DYNAMIC, None, device="cpu",
                                                                   progress=False),
        "quantize_model_w8a8": lambda: quantize_model_w8a8(make_tiny_llama(), DYNAMIC, None, progress=False),
        "calibration_batches": lambda: calibration_batches(make_tiny_tokenizer(), 2, 8),
    }


@pytest.mark.parametrize("name", ["quantize_model_rtn", "quantize_model", "quantize_layerwise", "quantize_w8a8",
                                  "quantize_layerwise_w8a8", "quantize_model_w8a8", "calibration_batches"])
def test_old_entry_points_warn_and_name_their_replacement(name, tiny_model_dir):
    replacement = {"quantize_model_w8a8": "llmq.ptq", "calibration_batches": "calibration_batch"}.get(name, "llmq.quantize")
    with pytest.warns(DeprecationWarning, match=replacement):
        _old_entry_points(tiny_model_dir)[name]()


def test_the_one_sampler_includes_the_last_window(tmp_path):
    tok = make_tiny_tokenizer()
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. The capital of France is Paris.")
    ids = tok(text.read_text().strip(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel()
    whole = calibration_batch(tok, CalibrationSpec(source=str(text), nsamples=3, seqlen=n))
    assert all(torch.equal(w, ids) for w in whole)  # offset N - seqlen = 0: the one window that fits is drawn
    windows = calibration_batch(tok, CalibrationSpec(source=str(text), nsamples=200, seqlen=n - 2))
    starts = {next(s for s in range(3) if torch.equal(ids[s:s + n - 2], w)) for w in windows}
    assert starts == {0, 1, 2}  # every offset up to N - seqlen, the last included
