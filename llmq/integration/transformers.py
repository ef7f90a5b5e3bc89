"""Plain ``from_pretrained`` support: registers the ``"llmq"`` quantization method.

``import llmq`` calls ``register()``. Then, for a folder whose ``config.json`` has
``quantization_config.quant_method == "llmq"``, ``AutoModelForCausalLM.from_pretrained``:

1. builds ``LlmqConfig`` from that block (format version checked),
2. builds the model skeleton on the meta device, and ``LlmqHfQuantizer`` replaces
   every ``nn.Linear`` named in ``quantization_config["modules"]`` by the empty
   quantized module of its kind (``llmq.nn.registry``), after checking that every
   shard is complete and holds the tensors those modules need,
3. loads the buffers from safetensors (float buffers are cast to ``dtype=``, integer
   codes stay integers) and places them per ``device_map=``.

Without ``import llmq``, transformers does not know the method: depending on its
version it raises an "unknown quantization type" error or — where it warns and
continues — builds plain ``nn.Linear`` layers whose weights are missing from the
checkpoint and therefore randomly initialised. We cannot hook into a process
that never imports llmq, so the README tells users to ``import llmq`` first, and
``llmq.load()`` does it for them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmq.checkpoint.config import QUANT_METHOD, validate_quantization_config
from llmq.checkpoint.verify import verify_checkpoint
from llmq.model.swap import set_submodule
from llmq.moe.families import is_fused_experts
from llmq.nn.quant_experts import QuantExperts
from llmq.nn.registry import build_module


class LlmqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of an llmq checkpoint, as transformers sees it.

    Holds the raw JSON block (``self.raw``); every key is also an attribute so
    transformers' generic code (``to_dict``, repr) works.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("quant_method", QUANT_METHOD)
        validate_quantization_config(kwargs, "quantization_config")
        self.raw = dict(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class LlmqHfQuantizer(HfQuantizer):
    """Loads pre-quantized llmq checkpoints (quantizing on the fly inside
    ``from_pretrained`` is not supported: use ``llmq quantize``)."""

    requires_calibration = True  # = pre-quantized checkpoints only
    quantization_config: LlmqConfig

    def __init__(self, quantization_config: LlmqConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._dtype: torch.dtype | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        # _process_model_before_weight_loading does not receive the dtype: keep it
        self._dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        files = kwargs.get("checkpoint_files")
        if files:
            verify_checkpoint(files, self.quantization_config.raw)
        for name, cfg in self.quantization_config.raw["modules"].items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"checkpoint quantizes module {name!r}, which this model architecture does not have; "
                    f"config.json and the weights do not match"
                ) from None
            if cfg.get("kind") == QuantExperts.KIND:  # MoE: replaces a fused-experts module, not a Linear
                if not is_fused_experts(linear):
                    raise ValueError(f"checkpoint holds quantized experts at {name!r}, but the model has a "
                                     f"{type(linear).__name__} there; config.json and the weights do not match")
                device = next(linear.parameters()).device
                set_submodule(model, name, QuantExperts.empty_like(linear, cfg, device=device))
                continue
            if not isinstance(linear, torch.nn.Linear):
                raise ValueError(f"checkpoint quantizes {name!r}, but it is a {type(linear).__name__}, not nn.Linear")
            module = build_module(cfg, linear.in_features, linear.out_features, linear.bias is not None,
                                  dtype=self._dtype, device=linear.weight.device)
            set_submodule(model, name, module)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from llmq.nn import prepare

        # backends chosen and kernel layouts held now, on the devices the weights were loaded to, so the
        # first forward may run inside torch.compile
        prepare(model)
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


_registered = False


def register() -> None:
    """Register ``"llmq"`` with transformers (idempotent: registering twice raises there)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LlmqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LlmqHfQuantizer)
    _registered = True
