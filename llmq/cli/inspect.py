"""``llmq inspect``: what a checkpoint holds — recipe, per-layer bits, sizes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmq.checkpoint.verify import read_safetensors_header


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show the recipe, per-layer bits and sizes of a checkpoint",
        description="Print the quantization recipe of an llmq checkpoint and, per quantized module, its shape, "
        "bits, group size and stored bytes (effective bits per weight include scales and zeros). "
        "Float model folders are listed too.",
    )
    p.add_argument("model", type=Path, help="checkpoint or model folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _tensor_bytes(files: list[Path]) -> dict[str, int]:
    sizes = {}
    for f in files:
        for name, t in read_safetensors_header(f).items():
            sizes[name] = t["data_offsets"][1] - t["data_offsets"][0]
    return sizes


def describe(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    config = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    sizes = _tensor_bytes(files)
    qcfg = config.get("quantization_config") or {}
    modules = []
    for name, cfg in (qcfg.get("modules") or {}).items():
        stored = sum(v for k, v in sizes.items() if k.startswith(name + "."))
        weights = cfg.get("in_features", 0) * cfg.get("out_features", 0)
        if cfg.get("kind") == "quant_experts":  # E experts of gate_up [2I, H] and down [H, I]
            weights = 3 * cfg["num_experts"] * cfg["hidden_size"] * cfg["intermediate_size"]
        modules.append({"name": name, **cfg, "bytes": stored,
                        "bits_per_weight": 8 * stored / weights if weights else None})
    return {
        "folder": str(folder),
        "model_type": config.get("model_type"),
        "quant_method": qcfg.get("quant_method"),
        "format_version": qcfg.get("format_version"),
        "recipe": qcfg.get("weight"),
        "extra": {k: v for k, v in qcfg.items() if k not in ("modules", "weight", "quant_method", "format_version")},
        "modules": modules,
        "total_bytes": sum(sizes.values()),
        "quantized_bytes": sum(m["bytes"] for m in modules),
        "shards": [f.name for f in files],
    }


def run(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['folder']}  ({info['model_type']}, {len(info['shards'])} shard(s), "
          f"{info['total_bytes'] / 1e6:.1f} MB of tensors)")
    if info["quant_method"] is None:
        print("not quantized (no quantization_config)")
        return 0
    print(f"quant_method {info['quant_method']}, format version {info['format_version']}")
    print(f"recipe: {json.dumps(info['recipe'])}")
    for key, value in info["extra"].items():
        print(f"{key}: {json.dumps(value)}")
    print(f"{'module':48s} {'kind':14s} {'shape':>11s} {'bits':>4s} {'group':>7s} {'sym':>5s} {'KB':>9s} {'bits/w':>6s}")
    for m in info["modules"]:
        shape = f"{m.get('out_features')}x{m.get('in_features')}"
        if m["kind"] == "quant_experts":  # experts x hidden x expert intermediate
            shape = f"{m['num_experts']}x{m['hidden_size']}x{m['intermediate_size']}"
        group = "chan" if m.get("group_size") is None else m.get("group_size")
        bpw = f"{m['bits_per_weight']:.2f}" if m["bits_per_weight"] else "-"
        print(f"{m['name']:48s} {m['kind']:14s} {shape:>11s} {m.get('bits', '-'):>4} {group:>7} "
              f"{str(m.get('symmetric', '-')):>5s} {m['bytes'] / 1e3:9.1f} {bpw:>6s}")
    print(f"quantized modules: {len(info['modules'])}, {info['quantized_bytes'] / 1e6:.2f} MB of "
          f"{info['total_bytes'] / 1e6:.2f} MB")
    return 0
