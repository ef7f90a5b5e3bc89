"""``llmq inspect``: what a checkpoint holds — recipe, per-layer bits, sizes (``llmq.checkpoint.describe``)."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show the recipe, per-layer bits and sizes of a checkpoint",
        description="Check a checkpoint as loading would (complete shards, tensors matching config.json), then "
        "print its quantization recipe, each quantized module in model order with its shape, bits, group "
        "size, levels (uniform or a codebook kind) and stored bytes (effective bits per weight include scales, zeros and codebooks), the parts kept in float "
        "(embeddings, lm_head) with their bytes, and the checkpoint's total size. Float model folders are "
        "listed too.",
    )
    p.add_argument("model", help="checkpoint or model folder, or 'smollm2-135m'")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    from llmq.checkpoint.describe import describe
    from llmq.model.source import resolve_model_path

    info = describe(resolve_model_path(args.model))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['folder']}  ({info['model_type']}, {len(info['shards'])} shard(s), "
          f"{_mb(info['total_bytes'])} of tensors, {_mb(info['file_bytes'])} on disk in all)")
    if info["quant_method"] is None:
        print("not quantized (no quantization_config)")
    else:
        print(f"quant_method {info['quant_method']}, format version {info['format_version']}")
        print(f"recipe: {json.dumps(info['recipe'])}")
        for key, value in info["extra"].items():
            print(f"{key}: {json.dumps(value)}")
        print(f"quantized modules ({info['order']}):")
        print(f"{'module':48s} {'kind':14s} {'shape':>11s} {'bits':>4s} {'group':>7s} {'sym':>5s} {'levels':>7s} "
              f"{'KB':>9s} {'bits/w':>6s}")
        for m in info["modules"]:
            shape = f"{m.get('out_features')}x{m.get('in_features')}"
            if m["kind"] == "quant_experts":  # experts x hidden x expert intermediate
                shape = f"{m['num_experts']}x{m['hidden_size']}x{m['intermediate_size']}"
            group = "chan" if m.get("group_size") is None else m.get("group_size")
            bpw = f"{m['bits_per_weight']:.2f}" if m["bits_per_weight"] else "-"
            print(f"{m['name']:48s} {m['kind']:14s} {shape:>11s} {m.get('bits', '-'):>4} {group:>7} "
                  f"{str(m.get('symmetric', '-')):>5s} {m.get('levels', 'uniform'):>7s} {m['bytes'] / 1e3:9.1f} "
                  f"{bpw:>6s}")
    print("kept in float:" if info["quant_method"] else "embeddings and linears:")
    for t in info["unquantized"]:
        shape = "x".join(map(str, t["shape"]))
        print(f"  {t['name']:46s} {t['kind'] or '-':14s} {shape:>11s} {t['dtype']:>5s} {t['bytes'] / 1e3:12.1f} KB")
    for name in info["tied"]:
        print(f"  {name:46s} tied to another tensor (not stored again)")
    other = info["other_float_tensors"]
    if other["count"]:
        print(f"  other float tensors (norms, biases, ...): {other['count']}, {other['bytes'] / 1e3:.1f} KB")
    if info["quant_method"]:
        print(f"quantized modules: {len(info['modules'])}, {_mb(info['quantized_bytes'])} of "
              f"{_mb(info['total_bytes'])} of tensors; checkpoint {_mb(info['file_bytes'])} on disk")
    return 0
