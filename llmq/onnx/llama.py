"""A Llama-style causal LM as an ONNX graph, written node by node: prefill, or prefill + decode with a KV cache.

Graph (B = batch, S = new tokens, P = cached tokens (0 without a cache), T = P + S, H/KV =
query/key-value heads, D = head dim, all float32)::

    input_ids [B, S] int64 ─ Gather(embed) ─▶ h [B, S, hidden]
    per decoder layer i:
        x = RMSNorm(h)                              x·rsqrt(mean(x²) + eps)·w
        q, k, v = q/k/v_proj(x)                     each an llmq Linear (llmq.onnx.linears)
        q, k = rotary(q), rotary(k)                 cos/sin rows P..T-1 of the model's own tables
        k, v = concat(past k, v; new k, v)          [B, KV, T, D]; only with a KV cache
        attn = softmax(q·kᵀ/√D + causal) · v        GQA: q as [B, KV, H/KV, S, D] against k, v [B, KV, 1, T, D];
                                                    query i sees keys j ≤ P + i
        h = h + o_proj(attn)
        h = h + down_proj(silu(gate_proj(RMSNorm(h))) * up_proj(RMSNorm(h)))
    logits [B, S, vocab] = lm_head(RMSNorm(h))      a tied head reuses the embedding initializer

With ``kv_cache=True`` the graph also takes ``past_key_values.{i}.key`` / ``.value`` ``[B, KV, P, D]``
(keys after rotary, as transformers caches them; ``P = 0`` for the prompt) and returns
``present.{i}.key`` / ``.value`` ``[B, KV, T, D]``: the layout optimum's ``decoder_model_merged``
uses, so one graph serves the prompt and every decode step.

The rotary tables come from the model's ``rotary_emb`` module (so its rope scaling and attention
scaling are whatever transformers computes) for positions ``0 .. max_position_embeddings - 1``.
Positions are ``P .. T-1``: every row is one unpadded sequence (no attention mask input).
Architectures other than plain Llama (Q/K norms, sliding windows, other activations) are refused
before any node is written.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from llmq.onnx.builder import GraphBuilder
from llmq.onnx.linears import emit_linear


def check_llama(model: nn.Module) -> None:
    """Raise ``ValueError`` naming what this exporter cannot express in ``model``."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind != "llama":
        raise ValueError(f"ONNX export supports Llama-style decoders (model_type 'llama'), got {kind!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"ONNX export supports SiLU MLPs, got hidden_act={cfg.hidden_act!r}")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("ONNX export: MLP biases are not supported")
    for i, layer in enumerate(model.model.layers):
        for part in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, part):
                raise ValueError(f"layer {i} has {part}: Q/K-norm attention is not supported by the ONNX exporter")


def rotary_tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[max_positions, D]`` float32 from the model's own rotary module."""
    cfg = model.config
    n = cfg.max_position_embeddings
    pos = torch.arange(n)[None]
    dummy = torch.zeros(1, n, 1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(dummy, pos)
    return cos[0].float(), sin[0].float()


class _Shapes:
    """Runtime shape pieces: B, S, P (cached tokens) and T = P + S as 1-D int64 tensors, and the
    causal mask ``[S, T]`` (0 where query i may see key j, i.e. j ≤ P + i; -inf elsewhere).

    ``past_key``: the name of one ``[B, KV, P, D]`` past input, or ``None`` (P = 0).
    """

    def __init__(self, b: GraphBuilder, ids: str, past_key: str | None = None) -> None:
        shape = b.op("Shape", [ids], "ids_shape")
        self.b = b
        self.batch = b.op("Slice", [shape, b.const([0], "int64"), b.const([1], "int64")], "B")
        self.seq = b.op("Slice", [shape, b.const([1], "int64"), b.const([2], "int64")], "S")
        if past_key is None:
            self.past = b.const([0], "int64")
        else:
            past_shape = b.op("Shape", [past_key], "past_shape")
            self.past = b.op("Slice", [past_shape, b.const([2], "int64"), b.const([3], "int64")], "P")
        self.total = b.op("Add", [self.past, self.seq], "T")
        axis0 = b.const([0], "int64")  # Range wants 0-d bounds: squeeze the 1-element shapes
        start, stop = b.op("Squeeze", [self.past, axis0]), b.op("Squeeze", [self.total, axis0])
        one, zero = b.const(1, "int64"), b.const(0, "int64")
        q_pos = b.op("Unsqueeze", [b.op("Range", [start, stop, one], "q_pos"), b.const([1], "int64")])  # [S, 1]
        k_pos = b.op("Unsqueeze", [b.op("Range", [zero, stop, one], "k_pos"), b.const([0], "int64")])  # [1, T]
        future = b.op("Greater", [k_pos, q_pos], "future")  # [S, T]
        self.mask = b.op("Where", [future, b.const(float("-inf")), b.const(0.0)], "causal_mask")

    def dims(self, *parts) -> str:
        """A 1-D int64 shape from ``"B"``, ``"S"`` and integers (``-1`` allowed)."""
        pieces = [self.batch if p == "B" else self.seq if p == "S" else self.b.const([p], "int64") for p in parts]
        return self.b.op("Concat", pieces, "shape", axis=0)


def _rmsnorm(b: GraphBuilder, x: str, norm: nn.Module, name: str) -> str:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    ms = b.op("ReduceMean", [b.op("Mul", [x, x]), b.const([-1], "int64")], f"{name}/ms", keepdims=1)
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ms, b.const(eps)])])], f"{name}/rsqrt")
    return b.op("Mul", [b.op("Mul", [x, inv]), b.init(f"{name}.weight", norm.weight.detach().float())], name)


def _rotate(b: GraphBuilder, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """``x·cos + rotate_half(x)·sin`` for ``x [B, S, heads, D]``; ``cos, sin [S, 1, D]``."""
    x1, x2 = b.op_multi("Split", [x, b.const([half, half], "int64")], [f"{name}/x1", f"{name}/x2"], axis=-1)
    rot = b.op("Concat", [b.op("Neg", [x2]), x1], f"{name}/rot", axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])], name)


class LayerCache(NamedTuple):
    """One layer's KV-cache graph input and output names."""

    past_key: str
    past_value: str
    present_key: str
    present_value: str

    @classmethod
    def of_layer(cls, i: int) -> "LayerCache":
        return cls(f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")


def head_dims(cfg) -> tuple[int, int, int]:
    """``(query heads, key-value heads, head dim)`` of a Llama config."""
    heads = cfg.num_attention_heads
    return heads, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def _attention(b: GraphBuilder, sh: _Shapes, attn: nn.Module, x: str, cos: str, sin: str, cfg, name: str,
               cache: LayerCache | None = None) -> str:
    """The attention block's output ``[B, S, hidden]``; with a ``cache``, the layer's past keys and
    values are read from its inputs and the concatenation is written to its present outputs."""
    heads, kv, d = head_dims(cfg)
    groups = heads // kv
    q = emit_linear(b, attn.q_proj, x, f"{name}.q_proj")
    k = emit_linear(b, attn.k_proj, x, f"{name}.k_proj")
    v = emit_linear(b, attn.v_proj, x, f"{name}.v_proj")
    q = _rotate(b, b.op("Reshape", [q, sh.dims("B", "S", heads, d)]), cos, sin, d // 2, f"{name}/q_rot")
    k = _rotate(b, b.op("Reshape", [k, sh.dims("B", "S", kv, d)]), cos, sin, d // 2, f"{name}/k_rot")
    k = b.op("Transpose", [k], perm=[0, 2, 1, 3])  # [B, KV, S, D]
    v = b.op("Transpose", [b.op("Reshape", [v, sh.dims("B", "S", kv, d)])], perm=[0, 2, 1, 3])
    if cache is not None:  # [B, KV, P, D] ++ [B, KV, S, D] -> [B, KV, T, D], returned as the new cache
        k = b.op("Concat", [cache.past_key, k], cache.present_key, axis=2)
        v = b.op("Concat", [cache.past_value, v], cache.present_value, axis=2)
    q = b.op("Transpose", [b.op("Reshape", [q, sh.dims("B", "S", kv, groups, d)])], perm=[0, 2, 3, 1, 4])
    kt = b.op("Transpose", [b.op("Unsqueeze", [k, b.const([2], "int64")])], perm=[0, 1, 2, 4, 3])  # [B,KV,1,D,T]
    v = b.op("Unsqueeze", [v, b.const([2], "int64")])  # [B, KV, 1, T, D]
    scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.const(d ** -0.5)], f"{name}/scores")  # [B, KV, G, S, T]
    probs = b.op("Softmax", [b.op("Add", [scores, sh.mask])], f"{name}/probs", axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 3, 1, 2, 4])  # [B, S, KV, G, D]
    ctx = b.op("Reshape", [ctx, sh.dims("B", "S", heads * d)], f"{name}/ctx")
    return emit_linear(b, attn.o_proj, ctx, f"{name}.o_proj")


def _mlp(b: GraphBuilder, mlp: nn.Module, x: str, name: str) -> str:
    gate = emit_linear(b, mlp.gate_proj, x, f"{name}.gate_proj")
    up = emit_linear(b, mlp.up_proj, x, f"{name}.up_proj")
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up], f"{name}/act")
    return emit_linear(b, mlp.down_proj, act, f"{name}.down_proj")


def build_llama_graph(model: nn.Module, seq_len: int | None, opset: int, kv_cache: bool = False):
    """The ``onnx.ModelProto`` of ``model`` (see module docstring).

    ``seq_len``: a fixed sequence length, or ``None`` for a dynamic ``sequence`` axis. The batch
    axis is always dynamic. ``kv_cache``: add the past/present key-value inputs and outputs (the
    sequence axis must then be dynamic: the prompt and the decode steps differ in length).
    """
    check_llama(model)
    b = GraphBuilder()
    onnx, tp = b.onnx, b.onnx.TensorProto
    cfg = model.config
    seq_dim = "sequence" if seq_len is None else int(seq_len)
    if seq_len is not None and not 1 <= seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"seq_len must be in [1, {cfg.max_position_embeddings}] (max_position_embeddings), "
                         f"got {seq_len}")
    if kv_cache and seq_len is not None:
        raise ValueError("a KV-cache graph takes prompts and single decode tokens alike: leave seq_len unset")
    ids = "input_ids"
    b._names.add(ids)
    n_layers = len(model.model.layers)
    caches = [LayerCache.of_layer(i) for i in range(n_layers)] if kv_cache else []
    b._names.update(c.past_key for c in caches)
    b._names.update(c.past_value for c in caches)
    sh = _Shapes(b, ids, caches[0].past_key if kv_cache else None)
    embed = model.model.embed_tokens.weight.detach().float()
    embed_name = b.init("model.embed_tokens.weight", embed)
    h = b.op("Gather", [embed_name, ids], "embeddings", axis=0)
    cos_t, sin_t = rotary_tables(model)
    rows = [sh.past, sh.total, b.const([0], "int64")]
    cos = b.op("Unsqueeze", [b.op("Slice", [b.init("rotary.cos", cos_t)] + rows, "cos"), b.const([1], "int64")])
    sin = b.op("Unsqueeze", [b.op("Slice", [b.init("rotary.sin", sin_t)] + rows, "sin"), b.const([1], "int64")])
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        x = _rmsnorm(b, h, layer.input_layernorm, f"{p}.input_layernorm")
        cache = caches[i] if kv_cache else None
        h = b.op("Add", [h, _attention(b, sh, layer.self_attn, x, cos, sin, cfg, f"{p}.self_attn", cache)],
                 f"{p}/attn_res")
        x = _rmsnorm(b, h, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
        h = b.op("Add", [h, _mlp(b, layer.mlp, x, f"{p}.mlp")], f"{p}/out")
    h = _rmsnorm(b, h, model.model.norm, "model.norm")
    head = model.lm_head
    if type(head) is nn.Linear and head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        logits = b.op("MatMul", [h, b.op("Transpose", [embed_name], "lm_head.weight_t", perm=[1, 0])], "lm_logits")
        if head.bias is not None:
            logits = b.op("Add", [logits, b.init("lm_head.bias", head.bias.detach().float())])
    else:
        logits = emit_linear(b, head, h, "lm_head")
    b.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="logits/Identity"))
    inputs = [onnx.helper.make_tensor_value_info(ids, tp.INT64, ["batch", seq_dim])]
    outputs = [onnx.helper.make_tensor_value_info("logits", tp.FLOAT, ["batch", seq_dim, cfg.vocab_size])]
    _, kv, d = head_dims(cfg)
    for c in caches:
        inputs += [onnx.helper.make_tensor_value_info(n, tp.FLOAT, ["batch", kv, "past_sequence", d])
                   for n in (c.past_key, c.past_value)]
        outputs += [onnx.helper.make_tensor_value_info(n, tp.FLOAT, ["batch", kv, "total_sequence", d])
                    for n in (c.present_key, c.present_value)]
    graph = onnx.helper.make_graph(b.nodes, "llmq_causal_lm", inputs, outputs, b.initializers)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                  producer_name="llmq", ir_version=10)
