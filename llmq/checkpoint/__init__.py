"""llmq checkpoints: safetensors shards + ``config.json`` with ``quantization_config``.

Layout of a checkpoint folder::

    config.json              model config; "quantization_config" = {"quant_method": "llmq",
                             "format_version": 1, "weight": <WeightRecipe>, "modules":
                             {module name: <module.to_config()>}, ...}
    model*.safetensors       shards (+ model.safetensors.index.json when sharded); each
                             quantized Linear "<name>" stores "<name>.qweight" int32,
                             "<name>.scales" fp16, "<name>.qzeros" uint8 (asymmetric, integer
                             zeros) or "<name>.zeros" fp16 (asymmetric, float zeros: the module
                             config says "zero_point": "float"),
                             "<name>.bias" (if any) — see llmq.nn.QuantLinear
    generation_config.json   copied from the source model
    tokenizer*.json, ...     copied from the source model

``export_checkpoint`` writes a checkpoint in compressed-tensors' ``pack-quantized`` format
(vLLM, transformers + compressed-tensors): see ``llmq.checkpoint.export``.
"""

from llmq.checkpoint.config import build_quantization_config, read_quantization_config
from llmq.checkpoint.export import export_checkpoint
from llmq.checkpoint.save import save_quantized
from llmq.checkpoint.verify import verify_checkpoint

__all__ = ["build_quantization_config", "export_checkpoint", "read_quantization_config", "save_quantized",
           "verify_checkpoint"]
