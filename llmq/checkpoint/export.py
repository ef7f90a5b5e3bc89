"""Export an llmq checkpoint to a format other runtimes load: compressed-tensors ``pack-quantized``.

vLLM loads ``pack-quantized`` checkpoints natively, and transformers loads them through the
``compressed-tensors`` package (which decompresses them on the CPU), so an exported folder runs
where llmq is not installed. Per quantized Linear ``<name>`` (K = in, N = out features,
b = bits, G = K / group_size, or 1 per channel)::

    <name>.weight_packed      int32 [N, K·b/32]   the codes of each output row as one dense bit
                                                  stream (``llmq.quant.packing.pack_bitstream``),
                                                  stored signed: code − 2**(b−1), packed with the
                                                  same offset, so the words hold the unsigned codes
    <name>.weight_scale       fp16  [N, G]        llmq's scales, transposed
    <name>.weight_zero_point  int32 [N·b/32, G]   asymmetric only: zero − 2**(b−1), packed along N
    <name>.weight_shape       int64 [2]           (N, K)
    <name>.bias                                   unchanged

and ``W = (q − z) · s`` gives exactly llmq's dequantized weight. Everything else (embeddings,
norms, an unquantized head) is copied unchanged, shard by shard, so memory stays at one shard.

What cannot be expressed is refused before anything is written: float zero points (HQQ's default
at 2-4 bits: re-quantize with ``--zero-point int``), a group that does not divide K (llmq pads the
last group; compressed-tensors has no partial groups), W8A8 or other non-weight-only modules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmq.checkpoint.config import read_quantization_config
from llmq.checkpoint.save import atomic_output_dir, check_output_dir
from llmq.checkpoint.verify import verify_checkpoint
from llmq.quant.packing import pack_bitstream, unpack

EXPORT_FORMATS = ("compressed-tensors",)
_QUANT_LINEAR = "quant_linear"


def export_checkpoint(src: str | Path, out: str | Path, fmt: str = "compressed-tensors",
                      force: bool = False) -> Path:
    """Write ``src`` (an llmq weight-only checkpoint) to ``out`` in format ``fmt``; returns ``out``.

    The source is only read. ``out`` is written to a temporary folder and renamed into place;
    an existing non-empty ``out`` is replaced only with ``force``.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    src = Path(src)
    qcfg = read_quantization_config(src)
    shards = sorted(src.glob("*.safetensors"))
    verify_checkpoint(shards, qcfg)
    modules = qcfg["modules"]
    _check_exportable(modules)
    out_path = check_output_dir(out, force, source_dir=src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = compressed_tensors_config(modules, _unquantized_linears(src, modules))
    with atomic_output_dir(out_path, force) as tmp:
        for shard in shards:
            save_file(_convert_shard(shard, modules), tmp / shard.name, metadata={"format": "pt"})
        _copy_index(src, tmp, modules)
        for f in src.iterdir():  # tokenizer, generation config, chat template, ...
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                             "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_path


def _check_exportable(modules: dict[str, dict]) -> None:
    other = sorted(n for n, c in modules.items() if c.get("kind") != _QUANT_LINEAR)
    if other:
        raise ValueError(f"only weight-only QuantLinear checkpoints export; {other[0]!r} is a "
                         f"{modules[other[0]].get('kind')!r} module ({len(other)} such modules)")
    for name, c in modules.items():
        if not c["symmetric"] and c.get("zero_point", "int") == "float":
            raise ValueError(f"{name} has float zero points (HQQ's default at 2-4 bits); compressed-tensors "
                             f"stores integer zeros: re-quantize with --zero-point int (or --sym)")
        g = c["group_size"]
        if g is not None and c["in_features"] % g:
            raise ValueError(f"{name}: in_features {c['in_features']} is not a multiple of group size {g} "
                             f"(llmq pads the last group; compressed-tensors has no partial groups): "
                             f"re-quantize with a group size that divides it, or per channel")
    kinds = {(c["bits"], c["group_size"], c["symmetric"]) for c in modules.values()}
    if len(kinds) > 1:
        raise ValueError(f"the modules use {len(kinds)} different (bits, group, symmetric) settings; "
                         f"export handles one setting per checkpoint")


def compressed_tensors_config(modules: dict[str, dict], ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` of a ``pack-quantized`` checkpoint whose quantized modules are ``modules``."""
    c = next(iter(modules.values()))
    weights = {"num_bits": c["bits"], "type": "int", "symmetric": c["symmetric"], "dynamic": False,
               "strategy": "channel" if c["group_size"] is None else "group", "group_size": c["group_size"],
               "observer": "minmax", "actorder": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def _unquantized_linears(src: Path, modules: dict[str, dict]) -> list[str]:
    """Names of the model's ``nn.Linear`` modules that llmq left in float (the ``ignore`` list)."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)  # trust_remote_code stays off
    config.quantization_config = None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in modules]


def _convert_shard(path: Path, modules: dict[str, dict]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as f:
        names = list(f.keys())
        owners = {n.rpartition(".")[0] for n in names}
        for name in names:
            module, _, leaf = name.rpartition(".")
            if module in modules and leaf in ("qweight", "scales", "qzeros"):
                continue  # converted below
            tensors[name] = f.get_tensor(name)
        for module in sorted(owners & set(modules)):
            tensors.update(_pack_quantized(module, modules[module], f))
    return tensors


def _pack_quantized(name: str, c: dict, f) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one QuantLinear read from the open safetensors file ``f``."""
    bits, k, n = c["bits"], c["in_features"], c["out_features"]
    codes = unpack(f.get_tensor(f"{name}.qweight"), bits, k)  # [K, N] uint8
    out = {f"{name}.weight_packed": pack_bitstream(codes.t(), bits),
           f"{name}.weight_scale": f.get_tensor(f"{name}.scales").t().contiguous(),
           f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not c["symmetric"]:
        zeros = f.get_tensor(f"{name}.qzeros")  # [G, N] uint8
        out[f"{name}.weight_zero_point"] = pack_bitstream(zeros, bits).t().contiguous()
    return out


def _copy_index(src: Path, tmp: Path, modules: dict[str, dict]) -> None:
    """Rewrite ``model.safetensors.index.json`` (sharded checkpoints) for the renamed tensors."""
    index = src / "model.safetensors.index.json"
    if not index.is_file():
        return
    data = json.loads(index.read_text())
    weight_map = {}
    for name, shard in data["weight_map"].items():
        module, _, leaf = name.rpartition(".")
        if module in modules and leaf in ("qweight", "scales", "qzeros"):
            new = {"qweight": ["weight_packed", "weight_shape"], "scales": ["weight_scale"],
                   "qzeros": ["weight_zero_point"]}[leaf]
            weight_map.update({f"{module}.{x}": shard for x in new})
        else:
            weight_map[name] = shard
    data["weight_map"] = weight_map
    (tmp / index.name).write_text(json.dumps(data, indent=2) + "\n")
