"""Typed per-method options of the weight-only methods: one frozen dataclass per method.

A ``WeightRecipe`` holds them as ``method_args`` — the JSON dict a checkpoint's ``quantization_config``
records (``"weight": {"method_args": {...}}``), unchanged, so checkpoints written before these classes
existed still load. ``WeightRecipe(method_args=GPTQOptions(percdamp=0.05))`` stores the options' dict;
``recipe.options`` (or ``options_for``) reads it back typed, every value checked here, once::

    GPTQOptions(blocksize=128, percdamp=0.01, act_order=True, clip_search=True, expert_min_tokens=64, ...)
    options_for("gptq", {"percdamp": 0.05}).percdamp   # 0.05; an unknown key or a bad value: ValueError

``"calibration"`` in ``method_args`` records the data a run used; it is not an option and is skipped.
W8A8's options (scheme, observer, SmoothQuant alpha, ...) are ``llmq.recipes.ActivationRecipe``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from llmq.recipes import WeightMethod

RECORD_KEYS = ("calibration",)  # in method_args, but records, not options


def _positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class _Options:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _MoEOptions(_Options):
    """MoE experts (``llmq.moe.calibrated``): an expert routed fewer (token, slot) pairs than
    ``expert_min_tokens`` during calibration is quantized with ``expert_fallback`` ("pooled": the method on
    statistics pooled over the block's experts; "rtn": round to nearest); docs/moe.md measures the default.
    ``expert_chunk``: experts whose GPTQ/AWQ statistics are held at once (0 = all; ``C`` bounds them to
    ``(C + 1)·K²`` per stage at ``ceil(E / C)`` replays of the layer; the codes are the same)."""

    expert_min_tokens: int = 64
    expert_fallback: str = "pooled"
    expert_chunk: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # the method's own options first, then the MoE ones (the order checkpoints record)
        return {**{k: v for k, v in d.items() if not k.startswith("expert_")},
                **{k: v for k, v in d.items() if k.startswith("expert_")}}

    def __post_init__(self) -> None:
        if not isinstance(self.expert_min_tokens, int) or self.expert_min_tokens < 0:
            raise ValueError(f"expert_min_tokens must be an integer >= 0, got {self.expert_min_tokens!r}")
        if self.expert_fallback not in ("rtn", "pooled"):
            raise ValueError(f"expert_fallback must be one of ('rtn', 'pooled') (what an MoE expert routed fewer "
                             f"than expert_min_tokens calibration tokens gets), got {self.expert_fallback!r}")
        if not isinstance(self.expert_chunk, int) or isinstance(self.expert_chunk, bool) or self.expert_chunk < 0:
            raise ValueError(f"expert_chunk must be an integer >= 0 (experts calibrated per pass; 0 = all at once), "
                             f"got {self.expert_chunk!r}")


@dataclass(frozen=True)
class RTNOptions(_Options):
    """Round to nearest; ``clip``: a per-group clipping search (``llmq.algorithms.RTNClip``, e.g. ``"mse"``)."""

    clip: str | None = None


@dataclass(frozen=True)
class GPTQOptions(_MoEOptions):
    """GPTQ (``llmq.algorithms.GPTQ``): ``blocksize`` columns per lazy batch, ``percdamp`` of the mean
    Hessian diagonal added as damping, ``act_order`` (columns by decreasing Hessian diagonal),
    ``clip_search`` (each group's range searched before the error feedback). Non-uniform levels
    (``llmq.quant.levels``): ``error_feedback`` False rounds every column to the nearest level with no OBS
    update ("k-means alone"); ``refit`` (kmeans) refits each channel's table under the full Hessian after
    the loop, kept only where it lowers the Hessian-weighted error."""

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    clip_search: bool = True
    error_feedback: bool = True
    refit: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("gptq", "blocksize", self.blocksize)
        if not isinstance(self.percdamp, (int, float)) or isinstance(self.percdamp, bool) or self.percdamp < 0:
            raise ValueError(f"gptq percdamp must be a number >= 0, got {self.percdamp!r}")


@dataclass(frozen=True)
class AWQOptions(_MoEOptions):
    """AWQ (``llmq.algorithms.AWQ``): ``n_grid`` scale exponents searched, ``clip`` / ``clip_grid`` /
    ``max_shrink`` the clipping search, ``scale_loss`` what scores the scales ("block": the attention / MLP
    output, as the reference code, on ``block_windows`` calibration windows; "linear": the Linears' outputs).
    ``gqa_fold``: under grouped-query attention also search ``o_proj``'s scales, tied across the query heads
    of each KV head, and fold them into ``v_proj`` (``llmq.arch.folding``); off (the default, as AutoAWQ
    and llm-compressor) ``o_proj`` is only clipped there, after the MLP, logged per layer. On SmolLM2 the
    default measured better on the selection and evaluation texts (docs/quality.md, "AWQ under GQA")."""

    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    scale_loss: str = "block"
    block_windows: int = 16
    gqa_fold: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("awq", "n_grid", self.n_grid)
        if self.scale_loss not in ("block", "linear"):
            raise ValueError(f"awq scale_loss must be 'block' (the attention / MLP output, as the reference code) "
                             f"or 'linear' (the Linears' outputs), got {self.scale_loss!r}")
        if not isinstance(self.gqa_fold, bool):
            raise ValueError(f"awq gqa_fold must be true or false, got {self.gqa_fold!r}")
        if not isinstance(self.block_windows, int) or self.block_windows < 1:
            raise ValueError(f"awq block_windows must be a positive number of calibration windows, "
                             f"got {self.block_windows!r}")


@dataclass(frozen=True)
class HQQOptions(_Options):
    """HQQ-style half-quadratic solver (``llmq.algorithms.HQQ``): ``iters`` iterations of the ``lp_norm``
    shrinkage with ``beta`` growing by ``kappa``; ``select_norm`` scores the candidates; ``keep`` "group"
    (each group's best zero) or "tensor" (the reference's one choice per tensor)."""

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    select_norm: float = 2.0
    keep: str = "group"

    def __post_init__(self) -> None:
        _positive_int("hqq", "iters", self.iters)
        if self.keep not in ("group", "tensor"):
            raise ValueError(f"hqq keep must be 'group' (each group's best zero) or 'tensor' (the reference's one "
                             f"choice per tensor), got {self.keep!r}")


OPTIONS: dict[WeightMethod, type[_Options]] = {
    WeightMethod.RTN: RTNOptions, WeightMethod.GPTQ: GPTQOptions, WeightMethod.AWQ: AWQOptions,
    WeightMethod.HQQ: HQQOptions,
}


def options_for(method: WeightMethod | str, method_args: dict[str, Any] | _Options | None = None) -> _Options:
    """``method``'s typed options from a recipe's ``method_args`` (defaults for missing keys; records such as
    ``"calibration"`` skipped). ``ValueError`` for a method with no options here, an unknown key, a bad value."""
    method = WeightMethod(method)
    if method not in OPTIONS:
        hint = {WeightMethod.QAT: " (QAT trains the model: llmq.qat, scripts/qat_finetune.py)",
                WeightMethod.SMOOTHQUANT: " (W8A8: llmq quantize --method smoothquant, an ActivationRecipe)"}
        raise ValueError(f"method {method.value!r} does not run in the weight-only layer pipeline"
                         f"{hint.get(method, '')}; choose one of {[m.value for m in OPTIONS]}")
    cls = OPTIONS[method]
    if isinstance(method_args, _Options):
        if not isinstance(method_args, cls):
            raise ValueError(f"{type(method_args).__name__} are not options of method {method.value!r} "
                             f"({cls.__name__})")
        return method_args
    given = {k: v for k, v in (method_args or {}).items() if k not in RECORD_KEYS}
    allowed = [f.name for f in fields(cls)]
    unknown = set(given) - set(allowed)
    if unknown:
        raise ValueError(f"unknown {method.value} arguments {sorted(unknown)}; allowed: {sorted(allowed)}")
    return cls(**given)
