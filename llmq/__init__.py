"""llmq: group-wise low-bit quantization of Hugging Face LLMs, with Triton kernels.

``import llmq`` registers the ``"llmq"`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(<llmq checkpoint>)`` rebuilds the quantized
modules. Import it before loading a checkpoint.
"""

__version__ = "0.1.0"

from llmq.integration.transformers import register as _register_with_transformers  # noqa: E402

_register_with_transformers()

from llmq.api import QuantizeResult, is_quantized_checkpoint, load, quantize  # noqa: E402
from llmq.nn import QuantLinear, set_backend  # noqa: E402
from llmq.recipes import FORMAT_VERSION, KVRecipe, WeightMethod, WeightRecipe, ZeroPoint  # noqa: E402

__all__ = [
    "FORMAT_VERSION",
    "QuantLinear",
    "QuantizeResult",
    "WeightMethod",
    "WeightRecipe",
    "ZeroPoint",
    "is_quantized_checkpoint",
    "load",
    "quantize",
    "set_backend",
    "QuantizedKVCache",
    "KVRecipe",
]


def __getattr__(name):
    # the KV cache pulls in Triton kernels: import it on first use, not with `import llmq`
    if name == "QuantizedKVCache":
        from llmq.kv.cache import QuantizedKVCache

        return QuantizedKVCache
    raise AttributeError(f"module 'llmq' has no attribute {name!r}")
