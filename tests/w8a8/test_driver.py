"""The W8A8 calibration driver: shared observers, what each observer sees, errors."""

import sys
from pathlib import Path

import pytest
import torch

from llmq.recipes import ActivationRecipe
from llmq.w8a8.quantize import observe_inputs

sys.path.insert(0, str(Path(__file__).parents[1]))
from w8a8_tiny import tiny_llama, token_batches  # noqa: E402

NAMES = [f"model.layers.{i}.{n}" for i in range(2) for n in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")]


def test_linears_reading_one_tensor_share_one_observer():
    model = tiny_llama()
    batches = token_batches(3)
    seen: dict[str, float] = {}

    def hook(name):
        def fn(_m, args):
            seen[name] = max(seen.get(name, 0.0), args[0].abs().max().item())
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in NAMES]
    obs = observe_inputs(model, NAMES, batches, ActivationRecipe(scheme="static", observer="minmax"), progress=False)
    for h in handles:
        h.remove()
    p = "model.layers.0"
    assert obs[f"{p}.self_attn.q_proj"] is obs[f"{p}.self_attn.k_proj"] is obs[f"{p}.self_attn.v_proj"]
    assert obs[f"{p}.mlp.gate_proj"] is obs[f"{p}.mlp.up_proj"]
    assert obs[f"{p}.self_attn.o_proj"] is not obs[f"{p}.mlp.down_proj"]
    assert len({id(o) for o in obs.values()}) == 2 * 4
    for name in NAMES:
        assert obs[name].batches == len(batches)  # shared observers count each batch once
        assert obs[name].threshold().item() == pytest.approx(seen[name], rel=1e-6)


def test_unreached_linear_is_a_clear_error():
    from llmq.w8a8.quantize import quantize_model_w8a8

    model = tiny_llama()
    # a Linear outside the forward path never gets calibration data
    model.extra = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="extra: calibration never reached this Linear"):
        quantize_model_w8a8(model, ActivationRecipe(scheme="static", observer="ema", smoothquant_alpha=None),
                            token_batches(1), progress=False)


def test_a_reused_address_is_not_a_shared_input():
    """Two Linears fed *different* temporaries of one shape: the second often lands at the address the first
    just freed. They must not share an observer (they once did, by comparing data pointers, which made
    gate/up take o_proj's range whenever the allocator reused the block)."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(256, 8), torch.nn.Linear(256, 8)

        def forward(self, input_ids, **_):  # run_calibration passes use_cache=False
            x = input_ids.float()[..., None].expand(*input_ids.shape, 256)
            first = self.a(x * 1.0)  # its input is freed when a returns ...
            return self.b(x * 3.0) + first  # ... and x * 3.0 is allocated, often in the same block

    batches = [torch.arange(1, 17)[None] for _ in range(4)]
    for _ in range(12):  # the reuse is up to the allocator (about 1 run in 3 here): try it many times
        obs = observe_inputs(Toy(), ["a", "b"], batches, ActivationRecipe(scheme="static", observer="minmax"),
                             progress=False)
        assert obs["a"] is not obs["b"]
        assert obs["b"].threshold().item() == pytest.approx(3 * obs["a"].threshold().item())
