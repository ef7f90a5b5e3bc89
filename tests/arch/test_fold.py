"""The one fold (``llmq.arch.folding``) on one decoder layer of every mapped family: exact for every
subgroup of the map, caught by the float check when the wiring is wrong."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmq.arch import FoldError, NormKind, Producer, arch_for, fold
from llmq.arch.folding import expand_heads, head_groups, producer_channels
from llmq.pipeline.layerwise import capture_layer0_inputs

sys.path.insert(0, str(Path(__file__).parent))
from tiny_families import DENSE, FOLDS_PER_LAYER, MOE, calibration_ids, tiny_model  # noqa: E402


def layer_and_probe(family):
    """Decoder layer 0 of a tiny ``family`` model and a probe: its fp32 output on two calibration windows."""
    model = tiny_model(family)
    layers = model.model.layers
    cpu = torch.device("cpu")
    inputs = capture_layer0_inputs(model, layers, calibration_ids(2), 2, cpu, cpu)
    layer = layers[0]

    def probe():
        out = layer(inputs.hidden[0], **inputs.kwargs[0])
        return (out[0] if isinstance(out, tuple) else out).float()

    return layer, probe


def random_scales(layer, sub, seed=0):
    """``[K]`` scales in [0.3, 3.3) on the consumers' inputs, tied across query heads for ``heads`` subgroups."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(producer_channels(layer, sub), generator=g) * 3 + 0.3
    return expand_heads(s, *head_groups(layer, sub)) if sub.heads else s


@pytest.mark.parametrize("family", DENSE + MOE)
def test_every_subgroup_folds_exactly(family, caplog):
    layer, probe = layer_and_probe(family)
    arch = arch_for(layer)
    assert arch is not None and len(arch.subgroups) == FOLDS_PER_LAYER[family]
    ref = probe()
    with caplog.at_level("DEBUG", logger="llmq.arch"):
        for i, sub in enumerate(arch.subgroups):
            fold(layer, sub, random_scales(layer, sub, i), "model.layers.0", probe=probe)
    errors = [r.args[-1] for r in caplog.records if r.msg.startswith("%s: folded")]
    assert len(errors) == len(arch.subgroups) and max(errors) < 1e-5
    assert (probe() - ref).norm() / ref.norm() < 1e-5  # all folds together


WRONG = {  # family → (subgroup index, the wrong producer): each a plausible misreading by module name
    "gemma3": (2, Producer("post_attention_layernorm", NormKind.ONE_PLUS_W)),  # sandwich norm: attention output
    "gemma2": (2, Producer("post_feedforward_layernorm", NormKind.ONE_PLUS_W)),  # normalises the MLP output
    "llama": (2, Producer("input_layernorm", NormKind.W)),
    "phi3": (3, Producer("mlp.gate_up_proj")),  # all of gate_up's rows, not only up's
}


@pytest.mark.parametrize("family", list(WRONG))
def test_wrong_producer_is_caught(family):
    layer, probe = layer_and_probe(family)
    index, producer = WRONG[family]
    sub = replace(arch_for(layer).subgroups[index], producer=producer)
    with pytest.raises(FoldError, match=rf"model.layers.0: .*{producer.name}.* map is wrong"):
        fold(layer, sub, random_scales(layer, sub), "model.layers.0", probe=probe)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_one_plus_w_norm_scaled_as_w_is_caught(family):
    """Gemma's RMSNorm is x̂·(1 + w): dividing w (not 1 + w) by s changes the layer."""
    layer, probe = layer_and_probe(family)
    sub = arch_for(layer).subgroups[0]
    wrong = replace(sub, producer=replace(sub.producer, norm=NormKind.W))
    with pytest.raises(FoldError, match="input_layernorm"):
        fold(layer, wrong, random_scales(layer, wrong), "model.layers.0", probe=probe)


def test_untied_gqa_scales_are_refused():
    layer, _ = layer_and_probe("llama")
    vo = arch_for(layer).subgroups[1]
    assert vo.heads and head_groups(layer, vo) == (2, 16)
    with pytest.raises(ValueError, match="equal across the 2 query heads"):
        fold(layer, vo, torch.rand(64) + 0.5, "model.layers.0")


def test_quantized_producer_keeps_codes_and_divides_scales():
    """A producer that is already quantized (v_proj before o_proj) has its per-row scales divided."""
    from llmq.arch.folding import fake_quantize_
    from llmq.quant.primitives import quantize_weight

    layer, probe = layer_and_probe("phi3")  # fused: only qkv_proj's last (v) rows are divided
    qkv = layer.self_attn.qkv_proj
    qw = quantize_weight(qkv.weight.data, 4, 32, False)
    fake_quantize_(qkv, qw)
    codes, scales = qw.codes.clone(), qw.scales.clone()
    sub = arch_for(layer).subgroups[1]
    s = random_scales(layer, sub)
    fold(layer, sub, s, "model.layers.0", probe=probe, qweights={"self_attn.qkv_proj": qw})
    v = slice(128 - 32, None)  # 4 heads q (64 rows), 2 KV heads k and v (32 rows each)
    assert torch.equal(qw.codes, codes) and torch.equal(qw.scales[:v.start], scales[:v.start])
    s_v = s.view(2, 2, 16)[:, 0].reshape(-1)
    torch.testing.assert_close(qw.scales[v], scales[v] / s_v[:, None], rtol=1e-3, atol=0)
    assert torch.equal(qkv.weight, qw.dequantize())
