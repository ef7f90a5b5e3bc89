"""Quantize a model larger than the memory budget: a random-weight Llama of ~1.7 B parameters.

1. Writes a random Llama (hidden 2048, intermediate 8192, 24 layers, vocab 32000:
   1.74 B parameters, 7.0 GB in fp32) to disk one decoder layer per safetensors
   shard, never holding more than one layer in memory.
2. In a fresh subprocess, quantizes it with the layer-wise driver, ``llmq.pipeline.run_layerwise``
   (one decoder layer materialised at a time, ``--max-memory`` checked up front; called directly
   because the folder has no tokenizer, which ``llmq.quantize`` would load)
   and saves the llmq checkpoint in small shards.
3. Reports the subprocess's peak RSS (``ru_maxrss``, in MB = 10^6 bytes) against the model size.

    python scripts/bench_memory_bound.py --max-memory-mb 3500 --method rtn

RTN is the default method because this is a memory demonstration on a shared
2-core CPU: the materialisation pattern is the same for every method (GPTQ/AWQ
add the calibration activations, which ``--max-memory`` accounts for).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def write_random_llama(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Random fp32 Llama in ``folder``, one shard per decoder layer; returns the parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                      max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="float32")
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel()

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    shard("embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"layer-{i:03d}.safetensors", {
            p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(hidden, hidden),
            p + "self_attn.v_proj.weight": rnd(hidden, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden),
            p + "mlp.gate_proj.weight": rnd(intermediate, hidden), p + "mlp.up_proj.weight": rnd(intermediate, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
        })
    shard("head.safetensors", {"model.norm.weight": torch.ones(hidden), "lm_head.weight": rnd(vocab, hidden)})
    index = {"metadata": {"total_size": total * 4}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def quantize_child(args) -> None:
    """Runs in the subprocess: quantize + save, print one JSON line."""
    torch.set_num_threads(args.threads)
    from llmq.checkpoint import build_quantization_config, save_quantized
    from llmq.pipeline import WeightQuantizer, run_layerwise
    from llmq.recipes import WeightRecipe
    from llmq.resources import peak_rss_mb

    recipe = WeightRecipe(bits=args.bits, group_size=args.group, symmetric=False, method=args.method)
    ids = None
    if args.method in ("gptq", "awq"):
        ids = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    model, summary = run_layerwise(args.model_dir, WeightQuantizer(recipe), ids, max_memory_mb=args.max_memory_mb,
                                   progress=True)
    quant_s = time.perf_counter() - t0
    peak_quant = peak_rss_mb()
    save_quantized(model, None, args.out_dir, build_quantization_config(model, recipe), force=True,
                   max_shard_size="300MB")
    peak_total = peak_rss_mb()
    print("RESULT " + json.dumps({"quantize_s": quant_s, "peak_rss_quantize_mb": peak_quant,
                                  "peak_rss_with_save_mb": peak_total, "bits_per_weight": summary.bits_per_weight,
                                  "linears": summary.linears, "model_mb_after": summary.model_mb_after}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/llmq-membench"))
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-memory-mb", type=float, default=3500)
    p.add_argument("--method", default="rtn", choices=["rtn", "hqq", "gptq", "awq"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the random model and the checkpoint")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        quantize_child(args)
        return
    model_dir, out_dir = args.work / "random-llama", args.work / "quantized"
    t0 = time.perf_counter()
    if not (model_dir / "model.safetensors.index.json").is_file():
        n_params = write_random_llama(model_dir, args.layers, args.hidden, args.intermediate, args.vocab)
    else:
        n_params = sum(v for v in [json.loads((model_dir / "model.safetensors.index.json").read_text())
                                   ["metadata"]["total_size"] // 4])
    disk_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6
    print(f"random Llama: {n_params / 1e9:.2f} B parameters, {disk_mb:.0f} MB on disk (written in "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--out-dir", str(out_dir),
           "--max-memory-mb", str(args.max_memory_mb), "--method", args.method, "--bits", str(args.bits),
           "--group", str(args.group), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"quantization subprocess failed (exit {proc.returncode})")
    res = {"params": n_params, "model_disk_mb": disk_mb, "max_memory_mb": args.max_memory_mb,
           "method": args.method, "bits": args.bits, "group_size": args.group, **json.loads(line[7:])}
    res["checkpoint_mb"] = sum(f.stat().st_size for f in out_dir.glob("*.safetensors")) / 1e6
    print(json.dumps(res, indent=1))
    print(f"\npeak RSS while quantizing: {res['peak_rss_quantize_mb']:.0f} MB "
          f"(with saving: {res['peak_rss_with_save_mb']:.0f} MB) for a {disk_mb:.0f} MB model; "
          f"budget {args.max_memory_mb:.0f} MB; checkpoint {res['checkpoint_mb']:.0f} MB")
    Path("results").mkdir(exist_ok=True)
    Path("results/memory_bound.json").write_text(json.dumps(res, indent=1))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
