"""State-dict hashes of tiny Llamas quantized by AWQ, GPTQ and W8A8 + SmoothQuant.

``EXPECTED`` holds the hashes the code at commit ea8115a (before the architecture maps)
produced; ``python tests/arch/regression.py`` recomputes them with whatever ``llmq`` is
importable. One CPU thread: the fp32 reductions then run in one fixed order.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import make_tiny_llama, save_model_dir  # noqa: E402

# case → sha256 of the decoder layers' state dict, as produced at ea8115a (torch 2.13 CPU; the same
# with transformers 5.17 and 5.25)
RECORDED_WITH_TORCH = "2.13"
EXPECTED: dict[str, str] = {
    'awq-mha': 'bb48a6134564d720d6fd38b6b08af8793e76602106a15ce5aa9e5e10f82c6582',
    'awq-gqa': '25a330f4e874fb44a6997c027fe107f046e28e6414a159791dd745070a053d64',
    'gptq-mha': '829ca368af648ed5f1e4f69561bd1ed3efeda2c79b007f2ffc283049e86af566',
    'gptq-gqa': '09a7aa701b35c9d651d2b58e5fee6658147b5e5775eb92e6a089dac2a2c8d02d',
    'w8a8sq-mha': '48c944a972f9a63532db0e93b308fadb960497d42547629ee3e40ed8097cf987',
    'w8a8sq-gqa': 'd730061fba9d67ed23403e704e0ba834978b2adff10c529c38c3955286f7ba8d',
    'w8a8sq-layerwise-mha': 'd9a718a4b9e645fb6f7dd0b9cb48d1ffc91868292519e629c963be6c8b6c9e72',
    'w8a8sq-layerwise-gqa': '1734b532cf786730892096e24e544adb1f9eebd32b7eb89cbe6917d7d6ddcd7e',
}
# cases whose result changed on purpose, and why
_PROPAGATION = ("on the CPU the layer pipeline now feeds each quantized layer's outputs to the next through the fp32 "
                "torch reference backend, not the bf16 cpu backend (merged with the maps; commit 9450dae)")
CHANGED = {"awq-gqa": "AWQ now folds o_proj's scales into v_proj under grouped-query attention (was clip-only)",
           "awq-mha": _PROPAGATION, "gptq-mha": _PROPAGATION, "gptq-gqa": _PROPAGATION}


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if "layers" in k:
            h.update(k.encode())
            h.update(v.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _calib_ids():
    return torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(1))


def compute(case: str, tmp: Path) -> str:
    """``case`` is ``"<method>-<mha|gqa>"``, method in awq, gptq, w8a8sq (in memory), w8a8sq-layerwise."""
    from llmq.pipeline import quantize_model
    from llmq.recipes import ActivationRecipe, WeightRecipe
    from llmq.w8a8 import quantize_model_w8a8
    from llmq.w8a8.layerwise import quantize_layerwise_w8a8

    method, attn = case.rsplit("-", 1)
    kv = 4 if attn == "mha" else 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_tiny_llama(kv_heads=kv)
        if method in ("awq", "gptq"):
            quantize_model(model, WeightRecipe(4, 32, False, method=method), _calib_ids(), batch_size=4,
                           progress=False)
            return _digest(model)
        recipe = ActivationRecipe(scheme="static", observer="minmax", smoothquant_alpha=0.5)
        batches = list(_calib_ids()[:4].split(1))
        if method == "w8a8sq":
            quantize_model_w8a8(model, recipe, batches, progress=False)
            return _digest(model)
        folder = save_model_dir(model, tmp / case)
        q, _ = quantize_layerwise_w8a8(folder, recipe, batches, batch_size=2, progress=False)
        return _digest(q)
    finally:
        torch.set_num_threads(threads)


CASES = [f"{m}-{a}" for m in ("awq", "gptq", "w8a8sq", "w8a8sq-layerwise") for a in ("mha", "gqa")]

if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for c in CASES:
            print(f"    {c!r}: {compute(c, Path(d))!r},", flush=True)
