"""Architecture maps: which module produces the input of which Linears, per decoder family, as data.

A *subgroup* is a set of Linears that read one tensor, and the module that produces it::

    Llama / Mistral / Qwen2 / Qwen3                 Gemma 2 / Gemma 3 (sandwich norms, RMSNorm is x̂·(1+w))
    x ─ input_layernorm ──▶ [q k v]                  x ─ input_layernorm ──▶ [q k v]
        v_proj ───────────▶ [o]        (GQA)             v_proj ───────────▶ [o]        (GQA)
    x ─ post_attention_layernorm ─▶ [gate up]          o ─ post_attention_layernorm ─(+)─ x    ✗ no Linear reads it
        up_proj ──────────▶ [down]                   x ─ pre_feedforward_layernorm ─▶ [gate up]
                                                         up_proj ──────────▶ [down]
                                                     d ─ post_feedforward_layernorm ─(+)─ x   ✗ no Linear reads it
    Phi-3 (fused projections)
    x ─ input_layernorm ──▶ [qkv_proj]
        qkv_proj rows of v (its last rows) ──▶ [o]      gate_up_proj rows of up (its last rows) ──▶ [down]

Dividing the producer's output channels by ``s`` and multiplying the consumers' input
columns by ``s`` leaves the layer's float function unchanged (``llmq.arch.folding``); AWQ and
SmoothQuant pick ``s``, GPTQ quantizes the subgroups in this order (true-sequential), and
the layer pipeline replays the blocks in ``replay`` from cached inputs.

Why each fold is exact:

* norm → Linears: a norm's output is ``x̂ · w`` (kind ``"w"``) or ``x̂ · (1 + w)`` (``"1+w"``,
  Gemma), linear per channel in ``w`` resp. ``1 + w``.
* ``v_proj → o_proj``: attention output = softmax(QKᵀ)·V is linear per channel in V; with
  grouped-query attention the query heads that read one KV head share that head's channels, so
  ``s`` is tied across each group (``heads=True``). QK-norm (Qwen3, Gemma 3) sits on q and k, not
  on v, and normalises per head: it does not touch these folds (q/k are consumers only).
* ``up_proj → down_proj``: ``down`` reads ``act(gate) · up``, linear per channel in ``up``.

A family's map is found by its decoder layer's class name (``arch_for``); a layer with no map
gets none: RTN, HQQ and GPTQ run (each Linear its own subgroup, no block replay), AWQ only clips
(with a warning naming each Linear), SmoothQuant refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn


class NormKind(str, Enum):
    """How a norm applies its weight: ``x̂ · w`` or ``x̂ · (1 + w)`` (Gemma's RMSNorm)."""

    W = "w"
    ONE_PLUS_W = "1+w"


@dataclass(frozen=True)
class Producer:
    """The module whose output the consumers read (local name inside the decoder layer).

    Attributes:
        name: e.g. ``"input_layernorm"`` or ``"self_attn.v_proj"``.
        norm: the norm's parameterisation, or ``None`` for a Linear (its output rows are scaled).
        fused_tail: the consumers read only the *last* rows of a fused Linear (v of Phi-3's
            ``qkv_proj``, up of its ``gate_up_proj``): as many rows as the producer has channels.
    """

    name: str
    norm: NormKind | None = None
    fused_tail: bool = False


@dataclass(frozen=True)
class Subgroup:
    """Linears that read one tensor, in the order the forward pass reaches them.

    Attributes:
        consumers: local names of the Linears (all of them compensate a fold, quantized or not).
        producer: what produced their input.
        block: module whose output scores AWQ's scales (``None``: the Linears' own output).
        heads: the consumers' input channels are attention heads over the producer's KV heads
            (``v → o``): the producer has ``num_kv_heads · head_dim`` channels, the consumers
            ``num_heads · head_dim``, and ``s`` is tied across the query heads of each KV head.
        attention: the attention module holding ``head_dim`` (for ``heads``).
    """

    consumers: tuple[str, ...]
    producer: Producer
    block: str | None = None
    heads: bool = False
    attention: str = "self_attn"


@dataclass(frozen=True)
class ArchMap:
    """One decoder family: its subgroups and which blocks may be replayed from a cached input.

    Attributes:
        family: a name for messages.
        layer_classes: decoder layer class names this map describes.
        subgroups: in forward order.
        replay: ``(last Linear, its block)`` pairs where the block's output is that Linear applied to
            its cached input (the attention returns ``(out, weights)``, the MLP ``out``).
    """

    family: str
    layer_classes: tuple[str, ...]
    subgroups: tuple[Subgroup, ...]
    replay: tuple[tuple[str, str], ...] = (("self_attn.o_proj", "self_attn"), ("mlp.down_proj", "mlp"))


def _attention(norm: NormKind = NormKind.W) -> tuple[Subgroup, ...]:
    return (
        Subgroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), Producer("input_layernorm", norm),
                 block="self_attn"),
        Subgroup(("self_attn.o_proj",), Producer("self_attn.v_proj"), heads=True),
    )


def _mlp(norm_name: str, norm: NormKind = NormKind.W) -> tuple[Subgroup, ...]:
    return (
        Subgroup(("mlp.gate_proj", "mlp.up_proj"), Producer(norm_name, norm), block="mlp"),
        Subgroup(("mlp.down_proj",), Producer("mlp.up_proj")),
    )


LLAMA_LIKE = _attention() + _mlp("post_attention_layernorm")
# Gemma: post_attention_layernorm normalises the attention *output* (sandwich norm); the MLP reads
# pre_feedforward_layernorm; neither post-norm feeds a Linear
GEMMA = _attention(NormKind.ONE_PLUS_W) + _mlp("pre_feedforward_layernorm", NormKind.ONE_PLUS_W)
PHI3 = (
    Subgroup(("self_attn.qkv_proj",), Producer("input_layernorm", NormKind.W), block="self_attn"),
    Subgroup(("self_attn.o_proj",), Producer("self_attn.qkv_proj", fused_tail=True), heads=True),
    Subgroup(("mlp.gate_up_proj",), Producer("post_attention_layernorm", NormKind.W), block="mlp"),
    Subgroup(("mlp.down_proj",), Producer("mlp.gate_up_proj", fused_tail=True)),
)

MAPS: tuple[ArchMap, ...] = (
    ArchMap("llama", ("LlamaDecoderLayer",), LLAMA_LIKE),
    ArchMap("mistral", ("MistralDecoderLayer",), LLAMA_LIKE),
    ArchMap("qwen2", ("Qwen2DecoderLayer",), LLAMA_LIKE),
    ArchMap("qwen3", ("Qwen3DecoderLayer",), LLAMA_LIKE),  # q_norm / k_norm: see the module docstring
    ArchMap("gemma2", ("Gemma2DecoderLayer",), GEMMA),
    ArchMap("gemma3", ("Gemma3DecoderLayer",), GEMMA),  # + QK-norm
    ArchMap("phi3", ("Phi3DecoderLayer",), PHI3),
    # MoE: post_attention_layernorm feeds the router and the fused 3-D experts (llmq.pipeline.experts),
    # which a fold cannot compensate: only the attention is mapped (and Qwen2-MoE's shared expert's
    # up -> down, a plain MLP); the MLP block is not replayed
    ArchMap("mixtral", ("MixtralDecoderLayer",), _attention(), replay=(("self_attn.o_proj", "self_attn"),)),
    ArchMap("qwen2_moe", ("Qwen2MoeDecoderLayer",),
            _attention() + (Subgroup(("mlp.shared_expert.down_proj",), Producer("mlp.shared_expert.up_proj")),),
            replay=(("self_attn.o_proj", "self_attn"),)),
    ArchMap("qwen3_moe", ("Qwen3MoeDecoderLayer",), _attention(), replay=(("self_attn.o_proj", "self_attn"),)),
)
_BY_CLASS = {cls: m for m in MAPS for cls in m.layer_classes}


def arch_for(layer: nn.Module) -> ArchMap | None:
    """The map of ``layer``'s decoder family (by its class name), or ``None`` for an unknown family."""
    return _BY_CLASS.get(type(layer).__name__)


def check_map(arch: ArchMap, layer: nn.Module, prefix: str) -> None:
    """Raise ``ValueError`` naming ``prefix`` if a module the map names is missing from ``layer`` (works on meta)."""
    modules = dict(layer.named_modules())
    for sub in arch.subgroups:
        for name in (*sub.consumers, sub.producer.name):
            if name not in modules:
                raise ValueError(f"{prefix}: the {arch.family} map names {name!r}, which "
                                 f"{type(layer).__name__} does not have")
            if name in sub.consumers and not isinstance(modules[name], nn.Linear):
                raise ValueError(f"{prefix}.{name}: the {arch.family} map says it is a Linear, "
                                 f"got {type(modules[name]).__name__}")


def replay_block(layer: nn.Module, linear: str) -> str | None:
    """The block of ``layer`` that may be replayed from ``linear``'s cached input (its map's ``replay``),
    or ``None`` (not a replayable Linear, or a layer with no map)."""
    arch = arch_for(layer)
    return None if arch is None else dict(arch.replay).get(linear)
