"""Tiny random causal LMs of every decoder family with an architecture map (transformers' own classes).

Two layers, hidden 64, 4 query heads over 2 KV heads (GQA), weights drawn with std 0.15 (HF's 0.02
init makes every activation tiny) and one outlier hidden channel in every norm that feeds Linears,
so AWQ and SmoothQuant pick scales far from 1 (a fold into the wrong producer then shows).
"""

from __future__ import annotations

import torch

# family → (number of map subgroups per layer = folds AWQ and SmoothQuant must find)
FOLDS_PER_LAYER = {"llama": 4, "mistral": 4, "qwen2": 4, "qwen3": 4, "gemma2": 4, "gemma3": 4, "phi3": 4,
                   "mixtral": 2, "qwen2_moe": 3, "qwen3_moe": 2}
DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
VOCAB = 128
LAYERS = 2


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=48)
    if family == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if family == "mistral":
        return tf.MistralConfig(**common), tf.MistralForCausalLM
    if family == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=16, **common), tf.Qwen3ForCausalLM
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=16, query_pre_attn_scalar=16, sliding_window=16, **common), \
            tf.Gemma2ForCausalLM
    if family == "gemma3":
        return tf.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=16, **common), \
            tf.Gemma3ForCausalLM
    if family == "phi3":
        return tf.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common), tf.Phi3ForCausalLM
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common), tf.MixtralForCausalLM
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=4, shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                 mlp_only_layers=[], **moe, **common), tf.Qwen2MoeForCausalLM
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[], **moe,
                                 **common), tf.Qwen3MoeForCausalLM
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, outlier_channel: int = 5):
    """A float32 ``*ForCausalLM`` of ``family`` in eval mode (see the module docstring)."""
    cfg, cls = _config(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    one_plus = family.startswith("gemma")  # Gemma's RMSNorm computes x̂ · (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif name.endswith("layernorm.weight"):
                p.copy_(torch.rand_like(p) * 0.5 + (0.0 if one_plus else 0.75))
                p[outlier_channel] = 19.0 if one_plus else 20.0
    return model


def calibration_ids(n: int = 4, seq: int = 24, seed: int = 1) -> torch.Tensor:
    """``[n, seq]`` int64 token ids."""
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
