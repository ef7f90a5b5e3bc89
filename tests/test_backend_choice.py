"""``llmq.backend_choice``: one chooser for every op kind — preferences, reasons, forcing, LLMQ_BACKEND."""

import ast
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import llmq.backend_choice as bc
from llmq.backend_choice import BACKEND_ENV, INTERPRET, BackendRegistry


@dataclass(frozen=True)
class Spec:
    device_type: str


class Fake:
    """Runs on the device types it is given; says why not otherwise."""

    def __init__(self, name, devices):
        self.name, self.devices = name, devices

    def can_implement(self, spec):
        if spec.device_type in self.devices:
            return True, f"{self.name} runs {spec.device_type}"
        return False, f"{self.name} needs one of {self.devices}"


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(bc, "_logged", set())
    r = BackendRegistry("test-op", ("triton", "torch"))
    for b in (Fake("torch", ("cpu", "cuda")), Fake(INTERPRET, ("cpu",)), Fake("triton", ("cuda",))):
        r.register(b)  # registration order does not matter: the preference does
    return r


def test_preference_order_and_forced_only_last(registry):
    assert registry.names() == ["triton", "torch", INTERPRET]
    assert registry.choose(Spec("cuda")).name == "triton"
    # triton-interpret can run CPU specs but is never chosen automatically
    assert registry.choose(Spec("cpu")).name == "torch"


def test_declines_and_choice_logged_once_at_info_with_reason(registry, caplog):
    with caplog.at_level(logging.INFO, logger="llmq"):
        for _ in range(3):
            registry.choose(Spec("cpu"))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert messages == ["llmq: test-op backend 'triton' declined: triton needs one of ('cuda',)",
                        "llmq: test-op backend 'torch' chosen: torch runs cpu"]


def test_forced_backend_that_cannot_run_raises_with_its_reason(registry):
    with pytest.raises(ValueError, match=r"forced backend 'triton' cannot run .*test-op.*needs one of \('cuda',\)"):
        registry.choose(Spec("cpu"), forced="triton")
    assert registry.choose(Spec("cpu"), forced=INTERPRET).name == INTERPRET


def test_unknown_forced_name_lists_the_available_ones(registry):
    with pytest.raises(ValueError, match=r"unknown backend 'cutlass': available backends are \['triton', 'torch', "
                                         r"'triton-interpret'\] \(for the test-op\)"):
        registry.choose(Spec("cpu"), forced="cutlass")


def test_no_backend_raises_with_every_reason(registry):
    with pytest.raises(ValueError, match=r"no test-op backend can run .*triton: triton needs .*torch: torch needs"):
        registry.choose(Spec("mps"))


def test_env_forces_and_argument_wins(registry, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, INTERPRET)
    assert registry.choose(Spec("cpu")).name == INTERPRET
    assert registry.choose(Spec("cpu"), forced="torch").name == "torch"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="forced backend 'triton' cannot run"):  # no silent fallback
        registry.choose(Spec("cpu"))


def test_env_naming_another_op_kinds_backend_chooses_automatically_and_says_so(registry, monkeypatch, caplog):
    monkeypatch.setenv(BACKEND_ENV, "cpu")  # a weight-matmul backend; test-op has none
    with caplog.at_level(logging.INFO, logger="llmq"):
        assert registry.choose(Spec("cpu")).name == "torch"
    assert any("'cpu' is not a test-op backend (LLMQ_BACKEND=cpu): choosing automatically" in r.getMessage()
               for r in caplog.records)


def test_env_naming_no_backend_at_all_raises(registry, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match=r"LLMQ_BACKEND='cuda-magic' names no backend: choose one of \["):
        registry.choose(Spec("cpu"))


def test_replaced_kv_variable_raises_naming_llmq_backend(registry, monkeypatch):
    monkeypatch.setenv("LLMQ_KV_ATTENTION", "torch")
    with pytest.raises(ValueError, match="LLMQ_KV_ATTENTION is no longer read: set LLMQ_BACKEND instead"):
        registry.choose(Spec("cpu"))


def test_user_backend_goes_first_and_can_be_removed(registry):
    registry.register(Fake("mine", ("cpu",)))
    assert registry.names()[0] == "mine" and registry.choose(Spec("cpu")).name == "mine"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Fake("mine", ("cpu",)))
    registry.unregister("mine")
    assert registry.names() == ["triton", "torch", INTERPRET]


def test_explain_gives_every_verdict(registry):
    assert registry.explain(Spec("cpu")) == [("triton", False, "triton needs one of ('cuda',)"),
                                             ("torch", True, "torch runs cpu"),
                                             (INTERPRET, True, f"{INTERPRET} runs cpu")]


def test_the_four_op_kinds_and_their_preferences():
    import llmq.kv.attention  # noqa: F401  registers the kv-attention backends
    import llmq.nn  # noqa: F401  registers the matmul and experts backends

    assert bc.preferences() == {
        "weight-matmul": ["triton", "cpu", "torch", INTERPRET],
        "w8a8-matmul": ["triton", "torch", INTERPRET],
        "experts": ["triton", "torch", INTERPRET],
        "kv-attention": ["triton", "torch", INTERPRET],
    }


def test_kv_attention_choice(monkeypatch):
    from llmq.kv.attention import choose_kv_attention_backend

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    q = torch.randn(1, 2, 8)
    assert choose_kv_attention_backend(q).name == "torch"  # CPU, even under TRITON_INTERPRET=1
    monkeypatch.setenv(BACKEND_ENV, INTERPRET)
    assert choose_kv_attention_backend(q).name == INTERPRET
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="forced backend 'triton' cannot run .*kv-attention.*needs a CUDA device"):
        choose_kv_attention_backend(q)


def test_interpreter_backend_needs_cpu_and_the_interpreter(monkeypatch):
    assert bc.triton_device_check("cpu", interpret=True)[0]  # conftest sets TRITON_INTERPRET=1
    ok, reason = bc.triton_device_check("cuda", interpret=True)
    assert not ok and "CPU only" in reason
    monkeypatch.setattr("llmq.kernels.interpreter.interpreting", lambda: False)
    ok, reason = bc.triton_device_check("cpu", interpret=True)
    assert not ok and "TRITON_INTERPRET=1" in reason
    assert bc.triton_device_check("cuda", interpret=False) is None
    ok, reason = bc.triton_device_check("cpu", interpret=False)
    assert not ok and INTERPRET in reason


def test_the_chooser_imports_no_backend():
    """One way: backends and modules import the chooser, never the reverse (module-level imports)."""
    tree = ast.parse(Path(bc.__file__).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.startswith("llmq")], names


def test_cuda_specs_pick_triton_for_every_op_kind(monkeypatch):
    """No GPU needed: the choice reads only the spec (and the device's capability, patched here)."""
    from llmq.kv.attention import KVAttentionSpec
    from llmq.nn.backends import LinearSpec
    from llmq.nn.expert_backends import ExpertsSpec
    from llmq.nn.w8a8_linear import W8A8Spec

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    f16 = torch.float16
    specs = {"weight-matmul": LinearSpec(64, 32, 4, 32, False, "cuda", f16),
             "w8a8-matmul": W8A8Spec(64, 32, False, "cuda", f16),
             "experts": ExpertsSpec(4, 64, 32, 4, 32, False, "int", "cuda", f16),
             "kv-attention": KVAttentionSpec("cuda", f16)}
    assert set(specs) == set(bc.REGISTRIES)
    for op, spec in specs.items():
        assert bc.REGISTRIES[op].choose(spec).name == "triton", op
        assert bc.REGISTRIES[op].choose(spec, forced="torch").name == "torch", op
        with pytest.raises(ValueError, match="forced backend 'triton-interpret' cannot run .*CPU only"):
            bc.REGISTRIES[op].choose(spec, forced=INTERPRET)
