"""Read a checkpoint lazily *by module name*, through transformers' own checkpoint conversion.

transformers 5.x does not assume a checkpoint's tensor names are the model's parameter names:
on load it applies the model's conversion mapping (``transformers.conversion_mapping``),
e.g. for Mixtral::

    model.layers.0.block_sparse_moe.gate.weight                  ─rename─▶  model.layers.0.mlp.gate.weight
    model.layers.0.block_sparse_moe.experts.{0..E-1}.w1.weight ┐
    model.layers.0.block_sparse_moe.experts.{0..E-1}.w3.weight ┴merge+cat▶ model.layers.0.mlp.experts.gate_up_proj

(and ``save_pretrained`` writes the per-expert names back). ``ConvertedCheckpoint`` indexes the
checkpoint's names once with transformers' ``rename_source_key`` and, when one parameter is
asked for, reads only its source tensors and runs a copy of the matching ``WeightConverter`` on
them — the same operations ``from_pretrained`` runs — so one decoder layer is materialised at a
time whatever the checkpoint's naming.
"""

from __future__ import annotations

import re
from copy import deepcopy

import torch
from torch import nn

from llmq.pipeline.lazy import LazyCheckpoint


def _natural_key(name: str) -> list:
    # experts.10 after experts.9: MergeModulelist stacks the tensors in the order they are added
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class ConvertedCheckpoint:
    """``LazyCheckpoint`` with the model's parameter names: ``get(param_name)`` converts as transformers does.

    Args:
        ckpt: the raw checkpoint index.
        model: the model skeleton (on ``meta``) whose parameter names ``get`` takes.

    Same interface as ``LazyCheckpoint`` (``get``, ``numel``, ``nbytes``, ``files``, ``folder``);
    ``numel``/``nbytes`` count the checkpoint's tensors under a name prefix (its layer numbering is
    the model's in every mapping transformers ships).
    """

    def __init__(self, ckpt: LazyCheckpoint, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.raw, self.model = ckpt, model
        self.folder, self.files = ckpt.folder, ckpt.files
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self._converters = {p: c for c in converters for p in c.source_patterns}
        expected = model.state_dict()  # meta tensors: names and shapes only
        self._shapes = {k: tuple(v.shape) for k, v in expected.items()}
        # parameter name -> (converter source pattern or None, [(checkpoint key, its pattern)])
        self._sources: dict[str, tuple[str | None, list[tuple[str, str | None]]]] = {}
        for key in sorted(ckpt.files, key=_natural_key):
            renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
            if renamed not in expected and key in expected:
                renamed, pattern = key, None
            if renamed not in expected:
                continue  # not a parameter of this model (transformers reports such keys as unexpected)
            first, keys = self._sources.setdefault(renamed, (pattern, []))
            keys.append((key, pattern))
        self._extra: dict[str, torch.Tensor] = {}  # other outputs of a one-to-many converter, until asked for

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The model's parameter ``name``, read from its source tensor(s) and converted."""
        if name in self._extra:
            return self._cast(self._extra.pop(name), dtype)
        if name not in self._sources:
            raise KeyError(f"parameter {name!r} of the model is not in the checkpoint at {self.folder}, under its own "
                           f"name or any name transformers' conversion mapping for "
                           f"{type(self.model).__name__} renames to it; the checkpoint is incomplete or of "
                           f"another architecture")
        pattern, keys = self._sources[name]
        if pattern is None:
            return self.raw.get(keys[0][0], dtype)
        converter = deepcopy(self._converters[pattern])
        for key, key_pattern in keys:
            converter.add_tensor(name, key, key_pattern, lambda key=key: self.raw.get(key))  # read on convert
        out = converter.convert(name, model=self.model, config=self.model.config)
        if name not in out:
            raise KeyError(f"transformers' converter {converter!r} did not produce {name!r} from {len(keys)} "
                           f"checkpoint tensors; the checkpoint is incomplete")
        tensor = out.pop(name)
        self._extra.update(out)
        want = self._shapes.get(name)
        if want is not None and tuple(tensor.shape) != want:
            sources = sorted({k for k, _ in keys}, key=_natural_key)
            raise ValueError(f"{name}: the checkpoint tensors it is built from ({len(sources)}: {sources[0]} … "
                             f"{sources[-1]}) give shape {tuple(tensor.shape)}, but the model needs {want}; an "
                             f"expert's tensor is missing from the checkpoint or the config does not match it")
        return self._cast(tensor, dtype)

    @staticmethod
    def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)

    def numel(self, prefix: str = "") -> int:
        return self.raw.numel(prefix)

    def nbytes(self, prefix: str = "") -> int:
        return self.raw.nbytes(prefix)
