"""A Llama-style causal LM (prefill, no KV cache) as an ONNX graph, written node by node.

Graph (B = batch, S = sequence, H/KV = query/key-value heads, D = head dim, all float32)::

    input_ids [B, S] int64 ─ Gather(embed) ─▶ h [B, S, hidden]
    per decoder layer i:
        x = RMSNorm(h)                              x·rsqrt(mean(x²) + eps)·w
        q, k, v = q/k/v_proj(x)                     each an llmq Linear (llmq.onnx.linears)
        q, k = rotary(q), rotary(k)                 cos/sin rows 0..S-1 of the model's own tables
        attn = softmax(q·kᵀ/√D + causal) · v        GQA: q as [B, KV, H/KV, S, D] against k, v [B, KV, 1, S, D]
        h = h + o_proj(attn)
        h = h + down_proj(silu(gate_proj(RMSNorm(h))) * up_proj(RMSNorm(h)))
    logits [B, S, vocab] = lm_head(RMSNorm(h))      a tied head reuses the embedding initializer

The rotary tables come from the model's ``rotary_emb`` module (so its rope scaling and attention
scaling are whatever transformers computes) for positions ``0 .. max_position_embeddings - 1``.
Positions are ``0 .. S-1``: every row is one unpadded sequence (no attention mask input).
Architectures other than plain Llama (Q/K norms, sliding windows, other activations) are refused
before any node is written.
"""

from __future__ import annotations

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
    """Runtime shape pieces: B, S as 1-D int64 tensors, and the causal mask ``[S, S]``."""

    def __init__(self, b: GraphBuilder, ids: str) -> None:
        shape = b.op("Shape", [ids], "ids_shape")
        self.b = b
        self.batch = b.op("Slice", [shape, b.const([0], "int64"), b.const([1], "int64")], "B")
        self.seq = b.op("Slice", [shape, b.const([1], "int64"), b.const([2], "int64")], "S")
        square = b.op("Concat", [self.seq, self.seq], "SxS", axis=0)
        ones = b.op("ConstantOfShape", [square], "ones_SxS", value=b.onnx.helper.make_tensor(
            "one", b.onnx.TensorProto.FLOAT, [1], [1.0]))
        future = b.op("Cast", [b.op("Trilu", [ones, b.const(1, "int64")], "upper", upper=1)], "future",
                      to=b.onnx.TensorProto.BOOL)
        self.mask = b.op("Where", [future, b.const(float("-inf")), b.const(0.0)], "causal_mask")  # [S, S]

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


def _attention(b: GraphBuilder, sh: _Shapes, attn: nn.Module, x: str, cos: str, sin: str, cfg, name: str) -> str:
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    groups = heads // kv
    q = emit_linear(b, attn.q_proj, x, f"{name}.q_proj")
    k = emit_linear(b, attn.k_proj, x, f"{name}.k_proj")
    v = emit_linear(b, attn.v_proj, x, f"{name}.v_proj")
    q = _rotate(b, b.op("Reshape", [q, sh.dims("B", "S", heads, d)]), cos, sin, d // 2, f"{name}/q_rot")
    k = _rotate(b, b.op("Reshape", [k, sh.dims("B", "S", kv, d)]), cos, sin, d // 2, f"{name}/k_rot")
    v = b.op("Reshape", [v, sh.dims("B", "S", kv, 1, d)])
    q = b.op("Transpose", [b.op("Reshape", [q, sh.dims("B", "S", kv, groups, d)])], perm=[0, 2, 3, 1, 4])
    kt = b.op("Transpose", [b.op("Reshape", [k, sh.dims("B", "S", kv, 1, d)])], perm=[0, 2, 3, 4, 1])  # [B,KV,1,D,S]
    v = b.op("Transpose", [v], perm=[0, 2, 3, 1, 4])  # [B, KV, 1, S, D]
    scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.const(d ** -0.5)], f"{name}/scores")  # [B, KV, G, S, S]
    probs = b.op("Softmax", [b.op("Add", [scores, sh.mask])], f"{name}/probs", axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 3, 1, 2, 4])  # [B, S, KV, G, D]
    ctx = b.op("Reshape", [ctx, sh.dims("B", "S", heads * d)], f"{name}/ctx")
    return emit_linear(b, attn.o_proj, ctx, f"{name}.o_proj")


def _mlp(b: GraphBuilder, mlp: nn.Module, x: str, name: str) -> str:
    gate = emit_linear(b, mlp.gate_proj, x, f"{name}.gate_proj")
    up = emit_linear(b, mlp.up_proj, x, f"{name}.up_proj")
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up], f"{name}/act")
    return emit_linear(b, mlp.down_proj, act, f"{name}.down_proj")


def build_llama_graph(model: nn.Module, seq_len: int | None, opset: int):
    """The ``onnx.ModelProto`` of ``model``'s prefill (see module docstring).

    ``seq_len``: a fixed sequence length, or ``None`` for a dynamic ``sequence`` axis. The batch
    axis is always dynamic.
    """
    check_llama(model)
    b = GraphBuilder()
    onnx, tp = b.onnx, b.onnx.TensorProto
    cfg = model.config
    seq_dim = "sequence" if seq_len is None else int(seq_len)
    if seq_len is not None and not 1 <= seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"seq_len must be in [1, {cfg.max_position_embeddings}] (max_position_embeddings), "
                         f"got {seq_len}")
    ids = "input_ids"
    b._names.add(ids)
    sh = _Shapes(b, ids)
    embed = model.model.embed_tokens.weight.detach().float()
    embed_name = b.init("model.embed_tokens.weight", embed)
    h = b.op("Gather", [embed_name, ids], "embeddings", axis=0)
    cos_t, sin_t = rotary_tables(model)
    rows = [b.const([0], "int64"), sh.seq, b.const([0], "int64")]
    cos = b.op("Unsqueeze", [b.op("Slice", [b.init("rotary.cos", cos_t)] + rows, "cos"), b.const([1], "int64")])
    sin = b.op("Unsqueeze", [b.op("Slice", [b.init("rotary.sin", sin_t)] + rows, "sin"), b.const([1], "int64")])
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        x = _rmsnorm(b, h, layer.input_layernorm, f"{p}.input_layernorm")
        h = b.op("Add", [h, _attention(b, sh, layer.self_attn, x, cos, sin, cfg, f"{p}.self_attn")], f"{p}/attn_res")
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
    graph = onnx.helper.make_graph(
        b.nodes, "llmq_causal_lm",
        [onnx.helper.make_tensor_value_info(ids, tp.INT64, ["batch", seq_dim])],
        [onnx.helper.make_tensor_value_info("logits", tp.FLOAT, ["batch", seq_dim, cfg.vocab_size])],
        b.initializers)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                  producer_name="llmq", ir_version=10)
