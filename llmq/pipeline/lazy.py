"""A model skeleton on ``meta`` whose tensors are read from the safetensors files on demand.

Only what is asked for is read (``safe_open(...).get_tensor(name)`` reads one
tensor's bytes), so a model much larger than memory can be walked one decoder
layer at a time: ``materialise(model, prefix, ...)`` fills one submodule.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn


class LazyCheckpoint:
    """Index of a safetensors checkpoint folder: tensor name → shard file.

    Args:
        folder: a Hugging Face model folder (``config.json`` + ``*.safetensors``,
            optionally ``model.safetensors.index.json``).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{self.folder} has no *.safetensors weights")
            self.files = {}
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        self.files[name] = shard
        self._sizes: dict[str, int] | None = None

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from its shard (``dtype``: cast after reading)."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        with safe_open(self.files[name], framework="pt") as f:
            t = f.get_tensor(name)
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)

    def numel(self, prefix: str = "") -> int:
        """Number of elements of the tensors whose names start with ``prefix``."""
        self.nbytes()
        return sum(v for k, v in self._numel.items() if k.startswith(prefix))

    def nbytes(self, prefix: str = "") -> int:
        """Bytes on disk of the tensors whose names start with ``prefix``."""
        if self._sizes is None:
            self._numel = {}
            self._sizes = {}
            for shard in set(self.files.values()):
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        numel = 1
                        for d in sl.get_shape():
                            numel *= d
                        self._numel[name] = numel
                        self._sizes[name] = numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        return sum(v for k, v in self._sizes.items() if k.startswith(prefix))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def empty_model(folder: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``folder/config.json`` with every parameter on ``meta`` (buffers stay real)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model.eval()


def materialise(
    model: nn.Module, prefix: str, ckpt: LazyCheckpoint, device: torch.device, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Read the parameters of submodule ``prefix`` from ``ckpt`` onto ``device``; returns the submodule.

    Parameters already materialised (not on ``meta``) are left alone, so tied
    weights are read once.
    """
    module = model.get_submodule(prefix)
    for local, param in list(module.named_parameters(recurse=True)):
        if param.device.type != "meta":
            continue
        full = f"{prefix}.{local}" if prefix else local
        set_module_tensor_to_device(module, local, device, value=ckpt.get(full, dtype), dtype=dtype)
    return module



def materialise_inputs_side(model: nn.Module, ckpt: LazyCheckpoint, device: torch.device) -> None:
    """What a layer-by-layer pass needs before decoder layer 0: the buffers (rotary tables, …) on
    ``device`` and the embeddings read there (a tied output head then shares the embedding weight)."""
    for name, _ in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, device)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            materialise(model, name, ckpt, device)
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def materialise_rest_on_host(model: nn.Module, ckpt: LazyCheckpoint) -> None:
    """Read every parameter still on ``meta`` (final norm, untied head, …) on the host, then move the
    whole model there: the end of a layer-by-layer pass."""
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta":
            materialise(model, name.rpartition(".")[0], ckpt, torch.device("cpu"))
    model.to("cpu")
