"""State-dict hashes of tiny models quantized by every method, recorded before the one-driver refactor.

``EXPECTED`` holds what the code at commit d3ceb86 (two drivers, five entry points) produced;
``python tests/pipeline/driver_regression.py`` recomputes them with whatever ``llmq`` is importable.
One CPU thread: the fp32 reductions then run in one fixed order. Each case is run through the public
``llmq.quantize`` (``compute(case, api="new")``) or the entry point it replaced (``api="old"``).
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import make_tiny_llama, save_model_dir  # noqa: E402

RECORDED_WITH_TORCH = "2.13"
# case → sha256 of the decoder layers' state dict at d3ceb86 (torch 2.13 CPU)
EXPECTED: dict[str, str] = {
    'rtn-memory': '8dd00d6c97e8f0221adbcb2da5a7522bac8e6ee5b0e366163776f1b171cbec12',
    'rtn-disk': '8dd00d6c97e8f0221adbcb2da5a7522bac8e6ee5b0e366163776f1b171cbec12',
    'rtn-clip-disk': '7245146afc94af015deda3ea6e8ed0dceb1cd678017bd8ac44124975589b5c4d',
    'gptq-memory': '898e78ff547aee53378d542a4dc44eee10c574def54fd89e8cda54644e4f719f',
    'gptq-disk': '7fd25da219b5adb0dc4249640dc560435e592e499d638f83621614caafc04b6e',
    'awq-disk': '2f898000fa131103e301d0533d61454774dad0debb0f6097ad35c005f3efdea8',
    'hqq-disk': 'e48f445a7a609460a9bb8b908d5e3dad96e25d015233c9e889cbffaf622a820f',
    'moe-rtn-memory': '903e67c3950e12fd7077b231fb251a652711965abc4d6e0b37796c382e3ec8d1',
    'moe-rtn-disk': '7c216b00390f2aea74950f5ae5edeee58bbb177807c2eda5b54e74d43f28c84d',
    'moe-gptq-disk': '660ec5d23c7cb79528a021225b41afd05afef2dce5649050e921fe4a46acd944',
    'moe-awq-disk': 'e7b0c2df11a4a7a6da2f36acb4ad49d3ad2f2196175c04fcd070c0cfca6da2c9',
    'w8a8-dynamic-disk': '3927239673d9d42b17e45ce758125c239442c3c85c2c062a3b0050e5acbac397',
    'w8a8-dynamic-sq-disk': 'fe78e6a52bdb12d95335e3644fe0a00c087b7bed11baa7a54c7218cdcd11bb21',
    'w8a8-static-disk': 'fe6785ce643c502fd73da1088febc883afb2e0dd4b85bb6c703f145b3ba71243',
    'w8a8-static-sq-disk': 'c68258d8f9bd74182ed6902be27441e228c3fde887c532e2b17b01ba3d78e21d',
    'w8a8-static-sq-memory': 'd730061fba9d67ed23403e704e0ba834978b2adff10c529c38c3955286f7ba8d',
}

# where llmq.quantize gives something else than the entry point it replaced, on purpose: on a model in
# memory W8A8 now runs in the one layer-wise driver (each layer calibrated on the quantized layers'
# outputs), so it equals the folder path's result for the same recipe (tests/arch/regression.py's
# 'w8a8sq-layerwise-gqa'); the whole-model float passes of quantize_model_w8a8 remain llmq.ptq's.
NEW_API: dict[str, str] = {
    'w8a8-static-sq-memory': '1734b532cf786730892096e24e544adb1f9eebd32b7eb89cbe6917d7d6ddcd7e',
}


def expected(case: str, api: str) -> str:
    return NEW_API.get(case, EXPECTED[case]) if api == "new" else EXPECTED[case]


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if "layers" in k:
            h.update(k.encode())
            h.update(v.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ids(vocab: int = 320):
    return torch.randint(0, vocab, (6, 24), generator=torch.Generator().manual_seed(1))


_WEIGHT = {  # case → (WeightRecipe kwargs, on disk?, MoE family or None)
    "rtn-memory": (dict(bits=4, group_size=32), False, None),
    "rtn-disk": (dict(bits=4, group_size=32), True, None),
    "rtn-clip-disk": (dict(bits=3, group_size=32, method="rtn", method_args={"clip": "mse"}), True, None),
    "gptq-memory": (dict(bits=4, group_size=32, method="gptq"), False, None),
    "gptq-disk": (dict(bits=4, group_size=32, symmetric=True, method="gptq"), True, None),
    # the AWQ cases were recorded when AWQ folded o_proj into v_proj under GQA, since opt-in (gqa_fold)
    "awq-disk": (dict(bits=4, group_size=32, method="awq", method_args={"gqa_fold": True}), True, None),
    "hqq-disk": (dict(bits=4, group_size=32, method="hqq"), True, None),
    "moe-rtn-disk": (dict(bits=4, group_size=32), True, "mixtral"),
    "moe-rtn-memory": (dict(bits=4, group_size=32), False, "qwen3_moe"),
    "moe-gptq-disk": (dict(bits=4, group_size=32, method="gptq", method_args={"expert_min_tokens": 4}), True,
                      "qwen3_moe"),
    "moe-awq-disk": (dict(bits=4, group_size=32, method="awq", method_args={"expert_min_tokens": 4, "gqa_fold": True}),
                     True, "mixtral"),
}
_W8A8 = {  # case → (ActivationRecipe kwargs, on disk?)
    "w8a8-dynamic-disk": (dict(scheme="dynamic", smoothquant_alpha=None), True),
    "w8a8-dynamic-sq-disk": (dict(scheme="dynamic", smoothquant_alpha=0.5), True),
    "w8a8-static-disk": (dict(scheme="static", observer="minmax", smoothquant_alpha=None), True),
    "w8a8-static-sq-disk": (dict(scheme="static", observer="percentile", smoothquant_alpha=0.8), True),
    "w8a8-static-sq-memory": (dict(scheme="static", observer="minmax", smoothquant_alpha=0.5), False),
}
CASES = list(_WEIGHT) + list(_W8A8)


def _weight_case(case, tmp, api):
    from llmq.recipes import WeightRecipe

    kwargs, disk, moe = _WEIGHT[case]
    recipe = WeightRecipe(**kwargs)
    if moe is not None:
        from moe_tiny import tiny_moe

        model = tiny_moe(moe)
    else:
        model = make_tiny_llama(kv_heads=2)
    ids = _ids() if recipe.method.value in ("gptq", "awq") else None
    if api == "new":
        import llmq

        source = save_model_dir(model, tmp / case) if disk else model
        result = llmq.quantize(source, recipe, calibration_ids=ids, batch_size=4, device="cpu", progress=False)
        return result.model
    if disk:
        from llmq.pipeline import quantize_layerwise

        q, _ = quantize_layerwise(save_model_dir(model, tmp / case), recipe, ids, device="cpu", batch_size=4,
                                  progress=False)
        return q
    if recipe.method.value == "rtn" and not recipe.method_args:
        from llmq.model.rtn import quantize_model_rtn

        quantize_model_rtn(model, recipe, progress=False)
        return model
    from llmq.pipeline import quantize_model

    quantize_model(model, recipe, ids, device="cpu", batch_size=4, progress=False)
    return model


def _w8a8_case(case, tmp, api):
    from llmq.recipes import ActivationRecipe

    kwargs, disk = _W8A8[case]
    recipe = ActivationRecipe(**kwargs)
    model = make_tiny_llama(kv_heads=2)
    needs = recipe.smoothquant_alpha is not None or recipe.scheme.value == "static"
    batches = list(_ids()[:4].split(1)) if needs else None
    if api == "new":
        import llmq

        source = save_model_dir(model, tmp / case) if disk else model
        ids = None if batches is None else torch.cat(batches)
        return llmq.quantize(source, recipe, calibration_ids=ids, batch_size=2, device="cpu", progress=False).model
    if disk:
        from llmq.w8a8.layerwise import quantize_layerwise_w8a8

        q, _ = quantize_layerwise_w8a8(save_model_dir(model, tmp / case), recipe, batches, batch_size=2,
                                       device="cpu", progress=False)
        return q
    from llmq.w8a8 import quantize_model_w8a8

    quantize_model_w8a8(model, recipe, batches, progress=False)
    return model


def compute(case: str, tmp: Path, api: str = "new") -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecations of the old entry points, AWQ's clip-only notes
            model = (_weight_case if case in _WEIGHT else _w8a8_case)(case, tmp, api)
        return _digest(model)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import tempfile

    api = sys.argv[1] if len(sys.argv) > 1 else "new"
    with tempfile.TemporaryDirectory() as d:
        for c in CASES:
            print(f"    {c!r}: {compute(c, Path(d), api)!r},", flush=True)
