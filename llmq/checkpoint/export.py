"""Export an llmq checkpoint to formats other runtimes load, without llmq installed.

compressed-tensors ``pack-quantized`` (``--format compressed-tensors``, the default): vLLM loads
it natively, and transformers through the ``compressed-tensors`` package. Per quantized Linear
``<name>`` (K = in, N = out features, b = bits, G = K / group_size, or 1 per channel)::

    <name>.weight_packed      int32 [N, K·b/32]   the codes of each output row as one dense bit
                                                  stream (``llmq.quant.packing.pack_bitstream``);
                                                  the format's signed codes q − 2**(b−1) are
                                                  packed with that offset added back, so the
                                                  words hold llmq's unsigned codes
    <name>.weight_scale       fp16  [N, G]        llmq's scales, transposed
    <name>.weight_zero_point  int32 [N·b/32, G]   asymmetric only: zeros packed along N, same offset
    <name>.weight_shape       int64 [2]           (N, K)

GPTQ v1 (``--format gptq``, ``checkpoint_format: "gptq"``, symmetric only): vLLM (GPTQ-Marlin),
GPTQModel, transformers + optimum::

    <name>.qweight            int32 [K·b/32, N]   the codes of each input column as one dense bit
                                                  stream along K (for 4 and 8 bits llmq's own layout)
    <name>.qzeros             int32 [G, N·b/32]   zero − 1 = 2**(b−1) − 1, packed along N
    <name>.scales             fp16  [G, N]        unchanged
    <name>.g_idx              int32 [K]           k // group_size (groups in input order)

Quantized MoE experts (``QuantExperts``) export to compressed-tensors only, as per-expert tensors
under the model's original checkpoint names (``llmq.checkpoint.export_moe``), which is what vLLM's
fused-MoE loader reads; every tensor name is written as transformers' ``save_pretrained`` would
(its reverse checkpoint conversion), the float routers listed in ``ignore``.

In both, ``<name>.bias`` is unchanged and the dequantized weight is exactly llmq's. Everything
else (embeddings, norms, an unquantized head) is copied unchanged, shard by shard, so memory stays
at one shard. What a format cannot express is refused before anything is written: float zero
points (HQQ's default at 2-4 bits: re-quantize with ``--zero-point int``), a group that does not
divide K (llmq pads the last group; these formats have no partial groups), W8A8 or other
non-weight-only modules, and per format what its ``check`` names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from safetensors.torch import save_file

from llmq._version import __version__
from llmq.checkpoint.config import read_quantization_config
from llmq.checkpoint.export_moe import check_experts_exportable, expert_tensors, original_expert_names, original_names
from llmq.checkpoint.save import atomic_output_dir, check_output_dir
from llmq.checkpoint.verify import verify_checkpoint
from llmq.quant.packing import pack_bitstream, unpack

_QUANT_LINEAR = "quant_linear"
_QUANT_EXPERTS = "quant_experts"
_LLMQ_LEAVES = ("qweight", "scales", "qzeros")  # what each format replaces


class CompressedTensorsFormat:
    """compressed-tensors ``pack-quantized`` (vLLM; transformers + the compressed-tensors package)."""

    name = "compressed-tensors"
    leaves = {"qweight": ("weight_packed", "weight_shape"), "scales": ("weight_scale",),
              "qzeros": ("weight_zero_point",)}

    def check(self, modules: dict[str, dict], unquantized: list[str]) -> None:
        """Every Linear setting llmq writes with integer zeros fits; experts need what vLLM's MoE kernels run."""
        check_experts_exportable(modules)

    def config(self, modules: dict[str, dict], unquantized: list[str]) -> dict[str, Any]:
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
            "ignore": unquantized,
            "kv_cache_scheme": None,
        }

    def tensors(self, name: str, c: dict, f) -> dict[str, torch.Tensor]:
        bits, k, n = c["bits"], c["in_features"], c["out_features"]
        codes = unpack(f.get_tensor(f"{name}.qweight"), bits, k)  # [K, N] uint8
        out = {f"{name}.weight_packed": pack_bitstream(codes.t(), bits),
               f"{name}.weight_scale": f.get_tensor(f"{name}.scales").t().contiguous(),
               f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        if not c["symmetric"]:
            zeros = f.get_tensor(f"{name}.qzeros")  # [G, N] uint8
            out[f"{name}.weight_zero_point"] = pack_bitstream(zeros, bits).t().contiguous()
        return out


class GPTQFormat:
    """GPTQ ``checkpoint_format: "gptq"`` (v1): vLLM (GPTQ-Marlin), GPTQModel, transformers + optimum.

    Symmetric only: v1 stores ``zero − 1``, so an asymmetric group whose zero is 0 cannot be written
    in a way every v1 reader decodes (they add 1 without wrapping); compressed-tensors stores
    asymmetric zeros exactly.
    """

    name = "gptq"
    leaves = {"qweight": ("qweight", "g_idx"), "scales": ("scales",), "qzeros": ("qzeros",)}

    def check(self, modules: dict[str, dict], unquantized: list[str]) -> None:
        experts = [n for n, c in modules.items() if c.get("kind") == _QUANT_EXPERTS]
        if experts:
            raise ValueError(f"--format gptq has no layout for quantized MoE experts ({experts[0]!r}): export with "
                             f"--format compressed-tensors, which vLLM's fused-MoE kernels load")
        c = next(iter(modules.values()))
        if not c["symmetric"]:
            raise ValueError("--format gptq exports symmetric checkpoints only (GPTQ v1 stores zero − 1, which "
                             "an asymmetric zero of 0 cannot survive): re-quantize with --sym, or export "
                             "asymmetric weights with --format compressed-tensors")
        inner = [n for n in unquantized if n != "lm_head"]
        if inner:
            raise ValueError(f"--format gptq quantizes every Linear of the decoder layers, but {inner[0]!r} "
                             f"({len(inner)} such modules) was left in float: use --format compressed-tensors, "
                             f"which lists them in 'ignore'")
        for name, m in modules.items():
            for what, size in (("in_features", m["in_features"]), ("out_features", m["out_features"])):
                if size * m["bits"] % 32:
                    raise ValueError(f"{name}: {what} {size} × {m['bits']} bits is not a whole number of int32 "
                                     f"words, which GPTQ's qweight/qzeros need: use --format compressed-tensors")

    def config(self, modules: dict[str, dict], unquantized: list[str]) -> dict[str, Any]:
        c = next(iter(modules.values()))
        return {"quant_method": "gptq", "bits": c["bits"], "group_size": c["group_size"] or -1,
                "desc_act": False, "sym": True, "static_groups": False, "true_sequential": True,
                "checkpoint_format": "gptq", "lm_head": "lm_head" in modules,
                "meta": {"quantizer": [f"llmq:{__version__}"]}}

    def tensors(self, name: str, c: dict, f) -> dict[str, torch.Tensor]:
        bits, k = c["bits"], c["in_features"]
        codes = unpack(f.get_tensor(f"{name}.qweight"), bits, k)  # [K, N] uint8
        scales = f.get_tensor(f"{name}.scales")  # [G, N]
        stored_zero = (1 << (bits - 1)) - 1  # v1: zero − 1
        g = c["group_size"] or k
        return {f"{name}.qweight": pack_bitstream(codes.t(), bits).t().contiguous(),  # [K·b/32, N]
                f"{name}.qzeros": pack_bitstream(torch.full_like(scales, stored_zero, dtype=torch.uint8), bits),
                f"{name}.scales": scales,
                f"{name}.g_idx": (torch.arange(k, dtype=torch.int32) // g)}


EXPORT_FORMATS = {fmt.name: fmt for fmt in (CompressedTensorsFormat(), GPTQFormat())}


def export_checkpoint(src: str | Path, out: str | Path, fmt: str = "compressed-tensors",
                      force: bool = False) -> Path:
    """Write ``src`` (an llmq weight-only checkpoint) to ``out`` in format ``fmt``; returns ``out``.

    The source is only read. ``out`` is written to a temporary folder and renamed into place;
    an existing non-empty ``out`` is replaced only with ``force``.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    writer = EXPORT_FORMATS[fmt]
    src = Path(src)
    qcfg = read_quantization_config(src)
    shards = sorted(src.glob("*.safetensors"))
    verify_checkpoint(shards, qcfg)
    modules = qcfg["modules"]
    _check_common(modules)
    skeleton = _skeleton(src)
    unquantized = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in modules]
    writer.check(modules, unquantized)
    names = _Names(skeleton, shards, modules)
    unquantized = [names.module(n) for n in unquantized + names.routers]
    out_path = check_output_dir(out, force, source_dir=src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = writer.config(modules, unquantized)
    with atomic_output_dir(out_path, force) as tmp:
        written = {}
        for shard in shards:
            tensors = _convert_shard(shard, modules, writer, names)
            save_file(tensors, tmp / shard.name, metadata={"format": "pt"})
            written.update({k: shard.name for k in tensors})
        _copy_index(src, tmp, written)
        for f in src.iterdir():  # tokenizer, generation config, chat template, ...
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                             "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_path


def _check_common(modules: dict[str, dict]) -> None:
    """What neither format can hold: other module kinds, float zeros, partial groups, mixed settings."""
    other = sorted(n for n, c in modules.items() if c.get("kind") not in (_QUANT_LINEAR, _QUANT_EXPERTS))
    if other:
        raise ValueError(f"only weight-only QuantLinear checkpoints export; {other[0]!r} is a "
                         f"{modules[other[0]].get('kind')!r} module ({len(other)} such modules)")
    for name, c in modules.items():
        if c.get("levels", "uniform") != "uniform":
            raise ValueError(f"{name} has {c['levels']} levels (codes index a codebook); GPTQ and compressed-tensors "
                             f"store integer grids (code - zero) * scale and no codebook: re-quantize with "
                             f"--levels uniform to export")
        if not c["symmetric"] and c.get("zero_point", "int") == "float":
            raise ValueError(f"{name} has float zero points (HQQ's default at 2-4 bits); the export formats "
                             f"store integer zeros: re-quantize with --zero-point int (or --sym)")
        g = c["group_size"]
        if g is not None and c.get("kind") == _QUANT_LINEAR and c["in_features"] % g:
            raise ValueError(f"{name}: in_features {c['in_features']} is not a multiple of group size {g} "
                             f"(llmq pads the last group; the export formats have no partial groups): "
                             f"re-quantize with a group size that divides it, or per channel")
    kinds = {(c["bits"], c["group_size"], c["symmetric"]) for c in modules.values()}
    if len(kinds) > 1:
        raise ValueError(f"the modules use {len(kinds)} different (bits, group, symmetric) settings; "
                         f"export handles one setting per checkpoint")


def _skeleton(src: Path) -> nn.Module:
    """The model of ``src/config.json`` on ``meta``, without its quantization (Linears and experts in float)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)  # trust_remote_code stays off
    config.quantization_config = None
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


class _Names:
    """Checkpoint names as transformers' ``save_pretrained`` writes them (llmq stores module names), the
    per-expert names of every experts module, and the MoE routers (kept in float)."""

    def __init__(self, skeleton: nn.Module, shards: list[Path], modules: dict[str, dict]) -> None:
        experts = [n for n, c in modules.items() if c.get("kind") == _QUANT_EXPERTS]
        self.experts = {n: original_expert_names(skeleton, n) for n in experts}
        plain = []
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                plain += [k for k in f.keys() if k.rpartition(".")[0].rpartition(".")[0] not in self.experts]
        self.tensor = original_names(skeleton, plain)
        self.routers = [f"{n.rpartition('.')[0]}.gate" for n in experts]  # the block's float router
        for router in self.routers:
            if f"{router}.weight" not in self.tensor:
                raise ValueError(f"{router}: expected the MoE router beside the experts; cannot name it in 'ignore'")
        linears = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
        self._weights = original_names(skeleton, [f"{n}.weight" for n in linears + self.routers])

    def module(self, name: str) -> str:
        """A Linear's or router's name in the original checkpoint naming (its ``.weight``, renamed)."""
        return self._weights[f"{name}.weight"][: -len(".weight")]


def _convert_shard(path: Path, modules: dict[str, dict], writer, names: _Names) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        owners = {n.rpartition(".")[0] for n in keys}
        for name in keys:
            module, _, leaf = name.rpartition(".")
            if module in modules and leaf in _LLMQ_LEAVES:
                continue  # converted below
            if module.rpartition(".")[0] in names.experts:
                continue  # an experts stack's tensor: written per expert below
            tensors[names.tensor[name]] = f.get_tensor(name)
        for module in sorted(owners & set(modules)):
            converted = writer.tensors(module, modules[module], f)
            renamed = names.module(module)
            tensors.update({renamed + k[len(module):]: v for k, v in converted.items()})
        stacks = {n.rpartition(".")[0] for n in owners if n.rpartition(".")[2] == "gate_up"}
        for module in sorted(stacks & set(names.experts)):
            tensors.update(expert_tensors(module, modules[module], f, names.experts[module]))
    return tensors


def _copy_index(src: Path, tmp: Path, written: dict[str, str]) -> None:
    """Rewrite ``model.safetensors.index.json`` (sharded checkpoints) for the tensors written."""
    index = src / "model.safetensors.index.json"
    if not index.is_file():
        return
    data = json.loads(index.read_text())
    data["weight_map"] = dict(sorted(written.items()))
    (tmp / index.name).write_text(json.dumps(data, indent=2) + "\n")
