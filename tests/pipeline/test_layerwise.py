"""The layer pipeline on a tiny random Llama: same result from disk as in memory, checkpoints, errors."""

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

import llmq
from llmq.checkpoint import build_quantization_config, save_quantized
from llmq.pipeline import quantize_layerwise, quantize_model
from llmq.arch import MAPS, fold
from llmq.recipes import WeightRecipe

METHODS = ["rtn", "gptq", "awq", "hqq"]


@pytest.fixture
def calib_ids():
    return torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(1))


def _ids_for(method, calib_ids):
    return calib_ids if method in ("gptq", "awq") else None


def _buffers(model):
    return {k: v for k, v in model.state_dict().items() if "layers" in k}


@pytest.mark.parametrize("method", METHODS)
def test_layerwise_from_disk_equals_in_memory(tiny_model_dir, calib_ids, method):
    """Materialising one layer at a time from the safetensors gives exactly the in-memory result."""
    recipe = WeightRecipe(3, 32, False, method=method)
    ids = _ids_for(method, calib_ids)
    lazy, summary = quantize_layerwise(tiny_model_dir, recipe, ids, batch_size=4, progress=False)
    full = make_tiny_llama()
    quantize_model(full, recipe, ids, batch_size=4, progress=False)
    a, b = _buffers(lazy), _buffers(full)
    assert a.keys() == b.keys() and any(k.endswith("qweight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert summary.linears == 14 and not any(p.is_meta for p in lazy.parameters())
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(lazy(x).logits, full(x).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("acts_on_host", [False, True], ids=["acts-on-gpu", "acts-on-host"])
@pytest.mark.parametrize("method", METHODS)
def test_layerwise_on_cuda_agrees_with_cpu(tiny_model_dir, calib_ids, method, acts_on_host, monkeypatch):
    """The CUDA path (layers on the GPU, finished layers back on the host) gives the CPU result up to
    float rounding: nearly all packed words equal, logits close. ``acts-on-host`` takes the branch a
    tight ``--max-memory`` takes: calibration activations and replay caches on the host."""
    from llmq.pipeline import driver

    if acts_on_host:
        monkeypatch.setattr(driver, "check_memory_plan", lambda *a: True)
    recipe = WeightRecipe(4, 32, False, method=method)
    ids = _ids_for(method, calib_ids)
    gpu, _ = quantize_layerwise(tiny_model_dir, recipe, ids, device="cuda", batch_size=4, progress=False)
    cpu, _ = quantize_layerwise(tiny_model_dir, recipe, ids, device="cpu", batch_size=4, progress=False)
    a, b = _buffers(gpu), _buffers(cpu)
    assert a.keys() == b.keys() and all(v.device.type == "cpu" for v in a.values())
    words = [k for k in a if k.endswith("qweight")]
    same = sum((a[k] == b[k]).sum().item() for k in words) / sum(a[k].numel() for k in words)
    assert same > 0.95, f"only {same:.1%} of the packed words agree"
    x = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        la, lb = gpu(x).logits, cpu(x).logits
    assert (la - lb).abs().max() <= 0.05 * lb.abs().max()


def test_batching_does_not_change_gptq(tiny_model_dir, calib_ids):
    recipe = WeightRecipe(4, 32, False, method="gptq")
    a, _ = quantize_layerwise(tiny_model_dir, recipe, calib_ids, batch_size=6, progress=False)
    b, _ = quantize_layerwise(tiny_model_dir, recipe, calib_ids, batch_size=2, progress=False)
    qa = a.model.layers[1].mlp.down_proj.qweight
    qb = b.model.layers[1].mlp.down_proj.qweight
    assert (qa != qb).float().mean() < 0.01  # fp32 summation order only


def test_gptq_act_order_checkpoint_loads_and_matches(tmp_path, tiny_model_dir, calib_ids):
    """Act-order + static groups: the saved checkpoint is canonical, plain from_pretrained reproduces it."""
    recipe = WeightRecipe(4, 32, False, method="gptq", method_args={"act_order": True})
    model, _ = quantize_layerwise(tiny_model_dir, recipe, calib_ids, progress=False)
    out = save_quantized(model, None, tmp_path / "q", build_quantization_config(model, recipe))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, llmq.QuantLinear)
    assert not hasattr(loaded.model.layers[0].self_attn.q_proj, "g_idx")  # no permutation needed
    x = torch.randint(0, 320, (2, 13))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_beat_rtn_on_logits(tiny_model_dir, calib_ids, method):
    fp = make_tiny_llama()
    x = calib_ids[:2]
    with torch.no_grad():
        ref = fp(x).logits
        err = {}
        for m in ("rtn", method):
            q, _ = quantize_layerwise(tiny_model_dir, WeightRecipe(3, 32, False, method=m), _ids_for(m, calib_ids),
                                      progress=False)
            err[m] = ((q(x).logits - ref) ** 2).mean().item()
    assert err[method] < err["rtn"]


def test_awq_folding_keeps_the_float_function():
    """Dividing a norm (or a producing Linear's rows) by s and the consumer's columns by 1/s is exact."""
    layer = make_tiny_llama(kv_heads=4).model.layers[0]
    h = torch.randn(2, 5, 64)
    s = torch.rand(64) + 0.5
    ref = layer.mlp(layer.post_attention_layernorm(h))
    gate_up, down = MAPS[0].subgroups[2:]  # llama: post_attention_layernorm -> gate/up, up_proj -> down
    fold(layer, gate_up, s, "layer")
    torch.testing.assert_close(layer.mlp(layer.post_attention_layernorm(h)), ref, atol=1e-5, rtol=1e-5)
    s2 = torch.rand(160) + 0.5
    fold(layer, down, s2, "layer")
    torch.testing.assert_close(layer.mlp(layer.post_attention_layernorm(h)), ref, atol=1e-5, rtol=1e-5)


def test_method_args_are_recorded_and_checked(tiny_model_dir, calib_ids):
    bad = WeightRecipe(4, 32, False, method="gptq", method_args={"dampening": 0.1})
    with pytest.raises(ValueError, match="unknown gptq arguments"):
        quantize_layerwise(tiny_model_dir, bad, calib_ids, progress=False)
    bad = WeightRecipe(4, 32, False, method="hqq", method_args={"keep": "layer"})
    with pytest.raises(ValueError, match="hqq keep must be 'group'.* got 'layer'"):
        quantize_layerwise(tiny_model_dir, bad, None, progress=False)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_method_without_data(tiny_model_dir, method):
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_layerwise(tiny_model_dir, WeightRecipe(4, 32, False, method=method), None, progress=False)


def test_max_memory_too_small_fails_before_work(tiny_model_dir, calib_ids, monkeypatch):
    from llmq.pipeline import driver

    monkeypatch.setattr(driver, "capture_layer0_inputs", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="--max-memory"):
        quantize_layerwise(tiny_model_dir, WeightRecipe(4, 32, False, method="gptq"), calib_ids,
                           max_memory_mb=1, progress=False)


def test_selecting_lm_head_is_refused(tiny_model_dir):
    recipe = WeightRecipe(4, 32, False, exclude=())
    with pytest.raises(ValueError, match="lm_head"):
        quantize_layerwise(tiny_model_dir, recipe, None, progress=False)
