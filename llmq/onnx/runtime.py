"""Run an exported model with onnxruntime (CPU) behind the call llmq's evaluation makes.

``OnnxCausalLM(dir)(input_ids=ids).logits`` gives ``[B, S, vocab]`` float32 torch logits, so
``llmq.eval.perplexity.perplexity(OnnxCausalLM(dir), tokenizer, ...)`` measures the ONNX model
with exactly the windows and loss llmq's own ``eval`` uses.

A graph exported with ``kv_cache=True`` also decodes::

    lm = OnnxCausalLM(dir)
    out = lm(input_ids=prompt, use_cache=True)                    # P = 0: empty past
    out = lm(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)

``past_key_values`` is a list of ``(key, value)`` float32 numpy arrays ``[B, KV, T, D]`` per layer,
exactly the graph's ``present.{i}`` outputs (kept in numpy so that no copy is made between steps).
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
        # the KV-cache inputs in layer order, with their [B, KV, P, D] shapes (KV and D fixed in the graph)
        self._past = {i.name: i.shape for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}
        self.has_kv_cache = bool(self._past)

    def __call__(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = False,
                 **_ignored) -> SimpleNamespace:
        if (use_cache or past_key_values is not None) and not self.has_kv_cache:
            raise ValueError("the exported graph is prefill-only (no KV cache): call with use_cache=False, "
                             "or export with `llmq export ... --format onnx --kv-cache`")
        ids = input_ids.detach().cpu().to(torch.int64).numpy()
        feeds = {"input_ids": ids}
        if self.has_kv_cache:
            feeds.update(self._past_feeds(past_key_values, batch=ids.shape[0]))
        if not use_cache:
            (logits,) = self.session.run(["logits"], feeds)
            return SimpleNamespace(logits=torch.from_numpy(logits))
        names = ["logits"] + [n.replace("past_key_values.", "present.") for n in self._past]
        logits, *present = self.session.run(names, feeds)
        return SimpleNamespace(logits=torch.from_numpy(logits),
                               past_key_values=list(zip(present[0::2], present[1::2])))

    def _past_feeds(self, past_key_values, batch: int) -> dict:
        """The graph's past inputs: ``past_key_values`` flattened, or empty ``[B, KV, 0, D]`` arrays."""
        import numpy as np

        if past_key_values is None:
            return {n: np.zeros((batch, shape[1], 0, shape[3]), np.float32) for n, shape in self._past.items()}
        flat = [t for pair in past_key_values for t in pair]
        if len(flat) != len(self._past):
            raise ValueError(f"past_key_values has {len(flat) // 2} layers, the graph {len(self._past) // 2}")
        return {n: np.asarray(t, np.float32) for n, t in zip(self._past, flat)}

    def parameters(self):
        return iter(())

    def buffers(self):
        return iter((self._device,))
