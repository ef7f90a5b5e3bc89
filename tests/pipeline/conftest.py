"""A tiny random Llama saved to disk, with a character-level tokenizer-free calibration batch."""

import pytest
import torch


def make_tiny_llama(num_kv_heads: int = 2, tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Folder with a random 2-layer Llama (GQA: 4 heads, 2 KV heads), fp32 safetensors."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def calib_ids():
    """``[8, 32]`` random token windows (seeded)."""
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
