"""QuantLinear through the Triton kernels (interpreter on CPU) == the torch backend; backend choice rules."""

import logging

import pytest
import torch

from llmq.nn import QuantLinear, available_backends, choose_backend, set_backend
from llmq.nn.backends import BACKEND_ENV, LinearSpec
from llmq.kernels.dequant_tile import repack_tiled
from llmq.nn.triton_backend import TritonBackend, TritonInterpreterBackend
from llmq.quant.primitives import quantize_weight


def make_layer(k=200, n=70, bits=4, group=64, symmetric=False, bias=True, backend=None):
    qw = quantize_weight(torch.randn(n, k) / k**0.5, bits, group, symmetric)
    return QuantLinear.from_quantized(qw, bias=torch.randn(n) if bias else None, backend=backend)


def spec(device_type="cpu", dtype=torch.float16):
    return LinearSpec(200, 70, 4, 64, False, device_type, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 64, False), (3, 32, True), (8, None, True), (2, 128, False)],
                         ids=["int4-g64-asym", "int3-g32-sym", "int8-perchannel-sym", "int2-g128-asym"])
@pytest.mark.parametrize("m", [1, 5, 33], ids=lambda m: f"M{m}")
def test_quant_linear_triton_matches_torch(m, bits, group, symmetric, dtype, kernel_tol):
    layer = make_layer(bits=bits, group=group, symmetric=symmetric)
    layer.bias.data = layer.bias.to(dtype)
    x = torch.randn(2, m, 200).to(dtype)
    layer.set_backend("torch")
    expected = layer(x)
    layer.set_backend("triton-interpret")
    y = layer(x)
    assert layer.backend_for(x).name == "triton-interpret"
    assert y.dtype == dtype and y.shape == (2, m, 70)
    torch.testing.assert_close(y, expected, **kernel_tol[dtype])


def test_cpu_never_picks_triton_automatically():
    """Under TRITON_INTERPRET=1 (set by conftest) automatic choice on CPU still gives torch."""
    assert available_backends().index("triton") < available_backends().index("torch")
    assert available_backends()[-1] == "triton-interpret"
    assert choose_backend(spec("cpu")).name == "torch"
    assert make_layer().backend_for(torch.randn(1, 200)).name == "torch"


def test_cuda_spec_picks_triton(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert choose_backend(spec("cuda")).name == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    ok, reason = TritonBackend().can_implement(spec("cuda"))
    assert not ok and "compute capability" in reason
    assert choose_backend(spec("cuda")).name == "torch"


def test_forcing_triton_on_cpu_raises_with_reason():
    layer = make_layer(backend="triton")
    with pytest.raises(ValueError, match="forced backend 'triton'.*needs a CUDA device.*triton-interpret"):
        layer(torch.randn(1, 200))


def test_env_var_forces_backend(monkeypatch, kernel_tol):
    layer = make_layer()
    x = torch.randn(3, 200)
    expected = layer(x)
    monkeypatch.setenv(BACKEND_ENV, "triton-interpret")
    layer.set_backend(None)
    assert layer.backend_for(x).name == "triton-interpret"
    torch.testing.assert_close(layer(x), expected, **kernel_tol[torch.float32])


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match="unknown backend 'cutlass'.*triton"):
        make_layer(backend="cutlass")(torch.randn(1, 200))


def test_interpreter_backend_reasons(monkeypatch):
    b = TritonInterpreterBackend()
    assert b.can_implement(spec("cpu"))[0]
    assert not b.can_implement(spec("cpu", torch.int8))[0]
    ok, reason = b.can_implement(spec("cuda"))
    assert not ok and "CPU only" in reason
    monkeypatch.setattr("llmq.kernels.interpreter.interpreting", lambda: False)
    ok, reason = b.can_implement(spec("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in reason


def test_choice_is_logged_once(caplog, monkeypatch):
    import llmq.backend_choice

    monkeypatch.setattr(llmq.backend_choice, "_logged", set())
    with caplog.at_level(logging.INFO, logger="llmq"):
        for _ in range(2):
            make_layer(backend="triton-interpret")(torch.randn(1, 200))
    assert sum("triton-interpret" in r.message for r in caplog.records) == 1


def test_weight_is_held_once_in_the_kernel_layout_and_saved_canonical(kernel_tol):
    """The layer holds qweight in the Triton kernels' layout (one copy, converted when built for that
    backend), state_dict gives canonical words back, load_state_dict takes canonical words and the next
    forward converts again."""
    layer = make_layer(backend="triton-interpret")
    assert layer.qweight_layout == "tiled"  # from_quantized prepared it for its forced backend
    canonical = layer.canonical_qweight()
    x = torch.randn(1, 200)
    layer(x)
    assert layer.qweight_layout == "tiled"
    assert torch.equal(layer.qweight, repack_tiled(canonical, 4, 200))
    assert [n for n, _ in layer.named_buffers()] == ["qweight", "scales", "qzeros", "bias"]
    assert torch.equal(layer.state_dict()["qweight"], canonical)
    assert torch.equal(layer.canonical_qweight(), canonical)

    other = make_layer()
    layer.load_state_dict(other.state_dict())
    assert layer.qweight_layout == "canonical" and torch.equal(layer.qweight, other.qweight)
    other.set_backend("torch")
    torch.testing.assert_close(layer(x), other(x), **kernel_tol[torch.float32])
    assert layer.qweight_layout == "tiled"


def test_switching_backends_converts_the_layout_each_way(kernel_tol):
    """A layer that ran the kernels (tiled) and then the torch backend (canonical) gives the same output."""
    layer = make_layer()
    x = torch.randn(3, 200)
    expected = layer(x)
    layer.set_backend("triton-interpret")
    torch.testing.assert_close(layer(x), expected, **kernel_tol[torch.float32])
    layer.set_backend("torch")
    assert torch.equal(layer(x), expected) and layer.qweight_layout == "canonical"


def test_set_backend_on_model(kernel_tol):
    model = torch.nn.Sequential(make_layer(), torch.nn.ReLU(), make_layer(k=70, n=30))
    x = torch.randn(4, 200)
    expected = model(x)
    set_backend(model, "triton-interpret")
    torch.testing.assert_close(model(x), expected, **kernel_tol[torch.float32])
    assert model[0].backend_for(x).name == "triton-interpret"


def test_first_call_inside_torch_compile(kernel_tol):
    """No eager call before torch.compile: the layers were prepared when built, so a full-graph compile's
    first call traces the kernel op and matches eager."""
    model = torch.nn.Sequential(make_layer(backend="triton-interpret"), torch.nn.SiLU(),
                                make_layer(k=70, n=30, backend="triton-interpret"))
    x = torch.randn(3, 200)
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert [m.qweight_layout for m in (model[0], model[2])] == ["tiled", "tiled"]
    torch.testing.assert_close(y, model(x), **kernel_tol[torch.float32])


def test_to_and_prepare_hold_the_layout_the_backend_reads():
    """.to() re-prepares (layout for the backend on the new device / dtype); llmq.nn.prepare does it for a
    model; a layer left unprepared gets a clear error inside torch.compile."""
    from llmq.nn import prepare

    layer = make_layer()
    layer.set_backend("triton-interpret")  # takes effect lazily: still canonical
    assert layer.qweight_layout == "canonical"
    layer.to(torch.float16)
    assert layer.qweight_layout == "tiled" and layer.scales.dtype == torch.float16
    assert layer.backend_for(torch.empty(0, 200, dtype=torch.float16)).name == "triton-interpret"

    model = torch.nn.Sequential(make_layer())
    set_backend(model, "triton-interpret")
    prepare(model, torch.float32)
    assert model[0].qweight_layout == "tiled"
    assert model[0]._backend[("cpu", torch.float32)].name == "triton-interpret"

    unprepared = make_layer()
    unprepared.set_backend("triton-interpret")
    with pytest.raises(Exception, match=r"llmq\.nn\.prepare\(model, dtype\) before compiling"):
        torch.compile(unprepared, backend="aot_eager", fullgraph=True)(torch.randn(2, 200))


def test_forced_backend_that_cannot_run_still_raises_at_forward_not_at_to():
    layer = make_layer(backend="triton")  # CUDA-only, on CPU: building and moving it must not raise
    layer.to(torch.float16)
    with pytest.raises(ValueError, match="forced backend 'triton'"):
        layer(torch.randn(1, 200, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64], ids=lambda m: f"M{m}")
def test_cuda_picks_triton_automatically(m, kernel_tol):
    layer = make_layer(k=1024, n=768).cuda().half()
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    y = layer(x)
    assert layer.backend_for(x).name == "triton"
    layer.set_backend("torch")
    torch.testing.assert_close(y, layer(x), **kernel_tol[torch.float16])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"], ids=["compile", "compile-cudagraphs"])
def test_cuda_torch_compile_and_cuda_graphs(mode, kernel_tol):
    """The kernels are torch.library ops: a full-graph compile (and CUDA-graph replay) gives eager's result."""
    model = torch.nn.Sequential(make_layer(k=576, n=1536), torch.nn.SiLU(), make_layer(k=1536, n=576)).cuda().half()
    x = torch.randn(4, 576, device="cuda", dtype=torch.float16)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):  # warm-up runs record / replay the graph
        y = compiled(x)
    torch.testing.assert_close(y, expected, **kernel_tol[torch.float16])


@pytest.mark.gpu
def test_cuda_first_call_inside_torch_compile(kernel_tol):
    """.cuda().half() prepares the layers (tiled layout, Triton chosen), so compiling needs no eager call."""
    model = torch.nn.Sequential(make_layer(k=576, n=1536), torch.nn.SiLU(), make_layer(k=1536, n=576)).cuda().half()
    assert model[0].qweight_layout == "tiled"
    x = torch.randn(4, 576, device="cuda", dtype=torch.float16)
    y = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(y, model(x), **kernel_tol[torch.float16])


@pytest.mark.gpu
def test_cuda_quantized_tiny_llama_checkpoint_runs_on_triton(tmp_path, kernel_tol):
    """quantize -> save -> from_pretrained(device_map="cuda"): every QuantLinear runs the Triton kernels and the
    logits match the torch backend on the same checkpoint."""
    from transformers import AutoModelForCausalLM

    import llmq
    from conftest import make_tiny_llama, make_tiny_tokenizer

    src = tmp_path / "src"
    make_tiny_llama(hidden=256, intermediate=576, heads=4, kv_heads=2).save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    llmq.quantize(str(src), llmq.WeightRecipe(bits=4, group_size=64), str(tmp_path / "q"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float16, device_map="cuda")
    ids = torch.randint(0, 320, (2, 33), device="cuda")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    x = torch.zeros(1, layers[0].in_features, device="cuda", dtype=torch.float16)
    assert layers and all(m.backend_for(x).name == "triton" for m in layers)
    logits = model(ids).logits
    set_backend(model, "torch")
    torch.testing.assert_close(logits, model(ids).logits, atol=5e-2, rtol=2e-2)
