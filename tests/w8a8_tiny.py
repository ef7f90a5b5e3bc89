"""A tiny random Llama (GQA, 2 layers) shared by the W8A8 tests; built in well under a second."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, outlier_channel: int | None = 5) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF init is tiny (std 0.02): use a livelier scale
            if p.dim() == 2:
                p.normal_(0, 0.15)
        if outlier_channel is not None:  # LLM-like activation outliers in one hidden channel
            for layer in model.model.layers:
                layer.input_layernorm.weight[outlier_channel] = 20.0
                layer.post_attention_layernorm.weight[outlier_channel] = 20.0
    return model


def token_batches(n: int = 4, seq: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, seq), generator=g) for _ in range(n)]
