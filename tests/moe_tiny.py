"""Tiny random mixture-of-experts models (transformers' own classes) for the MoE tests (tests/moe)."""

from __future__ import annotations

import torch


def tiny_moe(family: str, num_experts: int = 4, hidden: int = 64, inter: int = 96, layers: int = 2,
             seed: int = 0, std: float = 0.02):
    """A float32 ``*ForCausalLM`` of ``family`` ("mixtral" or "qwen3_moe") with random weights, in eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=320, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
                  initializer_range=std, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=inter, num_local_experts=num_experts, **common)
        model = MixtralForCausalLM(cfg)
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=2 * inter, moe_intermediate_size=inter, num_experts=num_experts,
                             head_dim=16, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **common)
        model = Qwen3MoeForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["mixtral", "qwen3_moe"]


def save_tiny_moe(family: str, folder, **kw):
    """Save ``tiny_moe(family, **kw)`` with a small tokenizer (what ``llmq quantize`` needs) to ``folder``."""
    from conftest import make_tiny_tokenizer

    model = tiny_moe(family, **kw)
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return model
