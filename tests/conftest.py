"""Shared test setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, at the very top, before llmq (and its kernels) are imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances for kernel-vs-reference comparisons on the *same* quantized weights,
# one row per activation dtype (fp32 accumulation everywhere).
KERNEL_TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests are skipped without CUDA (on a GPU: ``TRITON_INTERPRET=0 pytest -m gpu``)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    why = ("needs CUDA" if not torch.cuda.is_available()
           else "needs compiled Triton kernels: run GPU tests with TRITON_INTERPRET=0 pytest -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def kernel_tol():
    """``kernel_tol[dtype]`` → kwargs for ``torch.testing.assert_close``."""
    return KERNEL_TOLERANCES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps real numbers to integers. "
    "A scale and a zero point describe the mapping. The capital of France is Paris. "
    "Large language models are made of linear layers, attention and normalisation. "
) * 4


def make_tiny_tokenizer():
    """A small byte-level BPE tokenizer trained offline on a fixed text (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_tiny_llama(vocab_size=320, hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, seed=0):
    """A random LlamaForCausalLM small enough for unit tests (K = 64 and 160: not multiples of 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def save_model_dir(model, path):
    """Save ``model`` (fp32 safetensors) and the tiny tokenizer to ``path``, like a hub download."""
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny random Llama and a tokenizer, like a hub download."""
    return save_model_dir(make_tiny_llama(), tmp_path_factory.mktemp("tiny") / "tiny-llama")
