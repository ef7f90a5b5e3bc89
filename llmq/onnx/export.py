"""``export_onnx``: an llmq checkpoint (or a model in memory) → ``DIR/model.onnx`` with explicit Q/DQ.

::

    from llmq.onnx import export_onnx
    export_onnx("ckpt/", "onnx/")                      # dynamic batch and sequence axes
    export_onnx(model, "onnx/", seq_len=512, tokenizer=tok)   # e.g. a QAT model before convert_qat
    export_onnx("ckpt/", "onnx-kv/", kv_cache=True)     # + past/present key-value inputs and outputs (decode)

``DIR`` holds ``model.onnx`` (opset 21; weights inside, or in ``model.onnx.data`` beside it past
1.8 GB, the protobuf limit), ``llmq_onnx.json`` (what was exported: per Linear kind counts, opset,
axes, the source) and the tokenizer files. The folder is written atomically (a hidden temporary
folder renamed into place; nothing remains on error) and the source is only read. The model is
checked with ``onnx.checker`` (full check, shape inference) before the folder is published.
Graph and node conventions: ``llmq.onnx.llama`` and ``llmq.onnx.linears``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from llmq.checkpoint.save import atomic_output_dir, check_output_dir
from llmq.onnx.builder import OPSET
from llmq.onnx.deps import require_onnx
from llmq.onnx.llama import build_llama_graph

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB message limit, with room for the graph


@dataclass
class OnnxExport:
    path: Path  # the folder
    model_file: Path
    bytes_on_disk: int  # model.onnx (+ external data)
    linears: dict[str, int]  # module kind -> count
    seq_len: int | None
    opset: int
    kv_cache: bool = False

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.linears.items()))
        axis = "dynamic" if self.seq_len is None else str(self.seq_len)
        cache = ", with KV-cache inputs/outputs" if self.kv_cache else ""
        return (f"wrote {self.model_file} ({self.bytes_on_disk / 1e6:.1f} MB, opset {self.opset}, sequence axis "
                f"{axis}{cache}): {kinds}")


def linear_kinds(model: nn.Module) -> dict[str, int]:
    """How many Linears of each kind the decoder has (``QuantLinear`` split by bits/group/symmetry)."""
    from llmq.nn.quant_linear import QuantLinear
    from llmq.nn.w8a8_linear import W8A8Linear
    from llmq.qat.fake_quant import FakeQuantLinear

    out: Counter = Counter()
    for _, m in model.named_modules():
        if isinstance(m, W8A8Linear):
            out[f"W8A8Linear-{m.act_scheme.value}"] += 1
        elif isinstance(m, QuantLinear):
            out[f"QuantLinear-int{m.bits}-g{m.group_size}-{'sym' if m.symmetric else 'asym'}"] += 1
        elif isinstance(m, FakeQuantLinear):
            out[f"FakeQuantLinear-int{m.bits}-g{m.group_size}"] += 1
        elif type(m) is nn.Linear:
            out["float Linear"] += 1
    return dict(out)


def export_onnx(source: str | os.PathLike | nn.Module, out_dir: str | os.PathLike, seq_len: int | None = None,
                force: bool = False, tokenizer=None, trust_remote_code: bool = False,
                kv_cache: bool = False) -> OnnxExport:
    """Write ``source`` as ONNX into ``out_dir`` (see module docstring); returns what was written.

    Args:
        source: an llmq checkpoint folder (or a float model folder / short name), or a model in memory.
        seq_len: fixed sequence length, or ``None`` for a dynamic sequence axis.
        kv_cache: add ``past_key_values.{i}.key/value`` inputs and ``present.{i}.key/value`` outputs
            (``llmq.onnx.llama``); ``llmq.onnx.OnnxCausalLM`` feeds them back for decoding.
        tokenizer: saved beside the model when ``source`` is a module (a folder brings its own).

    Raises ``ValueError`` (before anything is written) for what ONNX cannot hold: float zero
    points, non-Llama architectures, unknown module kinds; ``ImportError`` without ``onnx``.
    """
    onnx = require_onnx()
    source_dir = None
    if isinstance(source, nn.Module):
        model = source
    else:
        from llmq.api import load
        from llmq.model.source import resolve_model_path

        source_dir = resolve_model_path(source)
        model, tokenizer = load(source_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    out = check_output_dir(out_dir, force, source_dir=source_dir)
    model.eval()
    proto = build_llama_graph(model, seq_len, OPSET, kv_cache=kv_cache)  # refuses what it cannot express, before any write
    kinds = linear_kinds(model)
    with atomic_output_dir(out, force) as tmp:
        path = tmp / "model.onnx"
        external = proto.ByteSize() > EXTERNAL_DATA_BYTES
        onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location="model.onnx.data")
        onnx.checker.check_model(str(path), full_check=True)
        meta = {"format": "onnx", "opset": OPSET, "seq_len": seq_len, "inputs": {"input_ids": ["batch", seq_len or
                "sequence"]}, "outputs": {"logits": ["batch", seq_len or "sequence", model.config.vocab_size]},
                "linears": kinds, "source": None if source_dir is None else str(source_dir),
                "kv_cache": kv_cache, "producer": "llmq.onnx.export_onnx"}
        (tmp / "llmq_onnx.json").write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in tmp.glob("model.onnx*"))
    return OnnxExport(out, out / "model.onnx", size, kinds, seq_len, OPSET, kv_cache)


def export_summary(result: OnnxExport) -> dict:
    d = asdict(result)
    d["path"], d["model_file"] = str(result.path), str(result.model_file)
    return d
