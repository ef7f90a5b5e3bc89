"""What a checkpoint (or float model folder) holds: ``llmq inspect``'s report, as a dict.

Per quantized module its recipe and stored bytes; per unquantized part (embeddings, an
untied ``lm_head``, Linears left in float) its shape, dtype and bytes; the rest (norms,
biases) summed; all in model order (the order of ``named_parameters`` of the model built
from ``config.json`` on the meta device, so ``layers.2`` comes before ``layers.10`` and
``q_proj`` before ``o_proj``). A quantized checkpoint is first checked exactly as the
loader checks it (``verify_checkpoint``): ``describe`` raises on what loading would refuse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmq.checkpoint.verify import read_safetensors_header


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def model_order(folder: Path) -> tuple[list[str], dict[str, str], str]:
    """``(parameter names in model order, {module name: class name}, how the order was found)``.

    Built on the meta device (no weights read). A model type transformers does not know
    (remote code, which inspect never runs) falls back to natural name order, and says so.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)  # trust_remote_code stays off
        config.quantization_config = None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as e:
        return [], {}, f"by name (transformers cannot build this model type: {type(e).__name__})"
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    return names, kinds, "model order"


def describe(folder: Path) -> dict[str, Any]:
    """Report for ``folder`` (resolved model folder). Raises ``ValueError`` when a quantized
    checkpoint fails the loader's checks."""
    from llmq.checkpoint.config import read_quantization_config
    from llmq.checkpoint.verify import verify_checkpoint
    from llmq.model.source import read_model_config

    config = read_model_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") == "llmq":
        verify_checkpoint(files, read_quantization_config(folder))  # what loading would refuse
    headers = {}
    for f in files:
        headers.update(read_safetensors_header(f))
    sizes = {name: t["data_offsets"][1] - t["data_offsets"][0] for name, t in headers.items()}

    order, kinds, how = model_order(folder)
    position = {n: i for i, n in enumerate(order)}

    def rank(module: str) -> tuple:
        first = min((position[n] for n in (f"{module}.weight", f"{module}.bias") if n in position), default=None)
        return (0, first) if first is not None else (1, _natural_key(module))

    qmodules = qcfg.get("modules") or {}
    modules = []
    for name in sorted(qmodules, key=rank):
        cfg = qmodules[name]
        stored = sum(v for k, v in sizes.items() if k.startswith(name + "."))
        weights = cfg.get("in_features", 0) * cfg.get("out_features", 0)
        if cfg.get("kind") == "quant_experts":  # E experts of gate_up [2I, H] and down [H, I]
            weights = 3 * cfg["num_experts"] * cfg["hidden_size"] * cfg["intermediate_size"]
        modules.append({"name": name, **cfg, "bytes": stored,
                        "bits_per_weight": 8 * stored / weights if weights else None})

    # float tensors outside the quantized modules: embeddings and Linears listed, the rest summed
    unquantized, other_bytes, other_count = [], 0, 0
    for tensor in sorted((t for t in sizes if t.rpartition(".")[0] not in qmodules),
                         key=lambda t: (position.get(t, len(position)), _natural_key(t))):
        module = tensor.rpartition(".")[0]
        kind = kinds.get(module)
        if kind is not None and ("Embedding" in kind or "Linear" in kind) or (not kinds and "embed" in module):
            unquantized.append({"name": tensor, "kind": kind, "shape": headers[tensor]["shape"],
                                "dtype": headers[tensor]["dtype"], "bytes": sizes[tensor]})
        else:
            other_bytes += sizes[tensor]
            other_count += 1
    # parameters the model has but the files do not store: tied to another tensor (lm_head usually)
    tied = [n for n in order if n not in sizes and n.rpartition(".")[0] not in qmodules]

    return {
        "folder": str(folder),
        "model_type": config.get("model_type"),
        "quant_method": qcfg.get("quant_method"),
        "format_version": qcfg.get("format_version"),
        "recipe": qcfg.get("weight"),
        "extra": {k: v for k, v in qcfg.items() if k not in ("modules", "weight", "quant_method", "format_version")},
        "order": how,
        "modules": modules,
        "unquantized": unquantized,
        "other_float_tensors": {"count": other_count, "bytes": other_bytes},
        "tied": tied,
        "total_bytes": sum(sizes.values()),
        "quantized_bytes": sum(m["bytes"] for m in modules),
        "file_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        "shards": [f.name for f in files],
    }
