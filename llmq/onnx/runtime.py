"""Run an exported model with onnxruntime (CPU) behind the call llmq's evaluation makes.

``OnnxCausalLM(dir)(input_ids=ids).logits`` gives ``[B, S, vocab]`` float32 torch logits, so
``llmq.eval.perplexity.perplexity(OnnxCausalLM(dir), tokenizer, ...)`` measures the ONNX model
with exactly the windows and loss llmq's own ``eval`` uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from llmq.onnx.deps import require_onnxruntime


class OnnxCausalLM:
    """An onnxruntime session over ``dir/model.onnx`` (CPU execution provider).

    ``accuracy_level``: onnxruntime fuses ``DequantizeLinear → MatMul`` of 4/8-bit weights into its
    ``MatMulNBits`` kernel, whose default (level 4) also quantizes the *activations* to int8 per
    block — a speed trade-off the graph does not say (it cost SmolLM2 perplexity, docs/ptq_onnx.md).
    Level 1 (the default here) computes in fp32: what the graph says, what verification needs.
    ``None`` keeps onnxruntime's own default.
    """

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, accuracy_level: int | None = 1) -> None:
        ort = require_onnxruntime()
        path = Path(folder) / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: export with `llmq export CKPT --format onnx --out DIR`")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        if accuracy_level is not None:
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._device = torch.zeros(0)  # perplexity() asks a model for its device through its tensors

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False, **_ignored) -> SimpleNamespace:
        if use_cache:
            raise ValueError("the exported graph is prefill-only (no KV cache): call with use_cache=False")
        ids = input_ids.detach().cpu().to(torch.int64).numpy()
        (logits,) = self.session.run(["logits"], {"input_ids": ids})
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def parameters(self):
        return iter(())

    def buffers(self):
        return iter((self._device,))
