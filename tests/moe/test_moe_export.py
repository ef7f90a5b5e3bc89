"""compressed-tensors export of quantized experts: vLLM's per-expert names and shapes, decoded back."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmq
from llmq.checkpoint.export import export_checkpoint
from llmq.recipes import WeightRecipe

sys.path.insert(0, str(Path(__file__).parents[1]))
from moe_tiny import FAMILIES, save_tiny_moe  # noqa: E402

# family -> (router, per-expert base name pattern of (expert, role)) as vLLM's FusedMoE mapping reads them
NAMES = {
    "mixtral": ("model.layers.{l}.block_sparse_moe.gate",
                {"gate": "model.layers.{l}.block_sparse_moe.experts.{e}.w1",
                 "up": "model.layers.{l}.block_sparse_moe.experts.{e}.w3",
                 "down": "model.layers.{l}.block_sparse_moe.experts.{e}.w2"}),
    "qwen3_moe": ("model.layers.{l}.mlp.gate",
                  {"gate": "model.layers.{l}.mlp.experts.{e}.gate_proj",
                   "up": "model.layers.{l}.mlp.experts.{e}.up_proj",
                   "down": "model.layers.{l}.mlp.experts.{e}.down_proj"}),
}
H, I, E = 64, 96, 4


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    save_tiny_moe(request.param, root / "src")
    result = llmq.quantize(root / "src", WeightRecipe(bits=4, group_size=32, symmetric=True), out_dir=root / "q",
                           progress=False)
    out = export_checkpoint(root / "q", root / "ct")
    return request.param, result.model, out


def test_per_expert_names_and_shapes_are_vllms(exported):
    family, _, out = exported
    tensors = load_file(out / "model.safetensors")
    router, bases = NAMES[family]
    for layer in range(2):
        assert tensors[router.format(l=layer) + ".weight"].dtype == torch.float32  # the router stays float
        for e in range(E):
            for role, (n, k) in {"gate": (I, H), "up": (I, H), "down": (H, I)}.items():
                base = bases[role].format(l=layer, e=e)
                assert tensors[f"{base}.weight_packed"].shape == (n, k * 4 // 32)
                assert tensors[f"{base}.weight_packed"].dtype == torch.int32
                assert tensors[f"{base}.weight_scale"].shape == (n, k // 32)
                assert tensors[f"{base}.weight_shape"].tolist() == [n, k]
    assert not any(".experts.gate_up" in k or ".experts.down." in k or k.endswith("experts.down_proj")
                   for k in tensors)  # nothing fused, nothing llmq-named
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert router.format(l=0) in q["ignore"] and "lm_head" in q["ignore"]
    assert q["config_groups"]["group_0"]["weights"]["symmetric"] is True


def test_compressed_tensors_decodes_every_expert(exported):
    base = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    family, model, out = exported
    tensors = load_file(out / "model.safetensors")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    _, bases = NAMES[family]
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        for e in range(E):
            gate_up, down = experts.gate_up.dequantize(e).t(), experts.down.dequantize(e).t()  # [2I, H], [H, I]
            for role, want in (("gate", gate_up[:I]), ("up", gate_up[I:]), ("down", down)):
                name = bases[role].format(l=layer, e=e)
                local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
                weight = base.PackedQuantizationCompressor.decompress(local, scheme)["weight"]
                assert torch.equal(weight, want.half()), name


def test_what_vllms_moe_kernels_cannot_run_is_refused(tmp_path):
    save_tiny_moe("qwen3_moe", tmp_path / "src")
    llmq.quantize(tmp_path / "src", WeightRecipe(bits=4, group_size=32, symmetric=False), out_dir=tmp_path / "asym",
                  progress=False)
    with pytest.raises(ValueError, match="symmetric 4- or 8-bit group-wise experts only.*--sym"):
        export_checkpoint(tmp_path / "asym", tmp_path / "a")
    llmq.quantize(tmp_path / "src", WeightRecipe(bits=4, group_size=32, symmetric=True), out_dir=tmp_path / "sym",
                  progress=False)
    with pytest.raises(ValueError, match="--format gptq has no layout for quantized MoE experts"):
        export_checkpoint(tmp_path / "sym", tmp_path / "b", fmt="gptq")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_gptq_inspect_export_on_a_per_expert_checkpoint(family, tmp_path, capsys):
    """The reported crash: `llmq quantize DIR --method gptq` on a saved MoE (per-expert tensors) now runs;
    inspect lists the experts; export writes them."""
    from llmq.cli.main import main

    save_tiny_moe(family, tmp_path / "src")
    assert main(["quantize", str(tmp_path / "src"), "--out", str(tmp_path / "q"), "--method", "gptq", "--bits", "4",
                 "--group", "32", "--sym", "--nsamples", "4", "--seqlen", "32", "--method-arg", "clip_search=false",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["experts_modules"] == 2
    assert main(["inspect", str(tmp_path / "q")]) == 0
    listing = capsys.readouterr().out
    assert "model.layers.1.mlp.experts" in listing and "quant_experts" in listing and "4x64x96" in listing
    assert main(["export", str(tmp_path / "q"), "--out", str(tmp_path / "ct")]) == 0
    assert (tmp_path / "ct" / "model.safetensors").is_file()
