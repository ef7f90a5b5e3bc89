"""AWQ's scale-search loss measured on the output of the block that holds the Linears.

The AWQ reference code scores a candidate scale by the output of the module
that *contains* the Linears (its ``module2inspect``): the whole attention for
q/k/v, the whole MLP for gate/up. That error passes through the softmax and the
``act(gate) · up`` product, which the Linears' own output error (the cheap
``XᵀX`` loss of ``llmq.algorithms.awq``) does not see::

    x ─▶ block(x; W_q, W_k, W_v, …)           reference output, float weights
    x ─▶ block(x; Q(W_q·s)/s, Q(W_k·s)/s, …)  candidate output
    loss(s) = ‖candidate − reference‖²  summed over the cached calibration windows

The block's inputs (positional and keyword arguments: hidden states, rotary
embeddings, attention mask) are recorded by a forward pre-hook during the
sub-group's calibration pass, for the first ``max_windows`` calibration windows
(whole batches: at least ``max_windows``), so each candidate costs one block
forward over those windows instead of a pass through the decoder layer.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockOutputLoss:
    """Squared output error of ``block`` when ``linears`` take candidate weights.

    Usage::

        loss = BlockOutputLoss(layer.self_attn, [q, k, v], max_windows=16)
        handle = layer.self_attn.register_forward_pre_hook(loss.record, with_kwargs=True)
        ... run the calibration pass ...
        handle.remove()
        loss.finish_recording()               # reference outputs, float weights
        err = loss([wq_hat, wk_hat, wv_hat])  # candidate weights, each [N_i, K], same dtype as the Linears

    The Linears' weights are restored after every call.
    """

    def __init__(self, block: nn.Module, linears: list[nn.Linear], max_windows: int, name: str = "block") -> None:
        if max_windows < 1:
            raise ValueError(f"{name}: the block loss needs at least one calibration window, got {max_windows}")
        self.block, self.linears, self.max_windows, self.name = block, linears, max_windows, name
        self.calls: list[tuple[tuple, dict]] = []
        self.reference: list[torch.Tensor] = []
        self.windows = 0

    def record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (``with_kwargs=True``): keep the block's inputs until ``max_windows`` are held."""
        if self.windows >= self.max_windows:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls.append((args, dict(kwargs)))
        self.windows += hidden.shape[0]

    @torch.no_grad()
    def finish_recording(self) -> None:
        """Compute the reference outputs with the Linears' current (float) weights."""
        if not self.calls:
            raise ValueError(f"{self.name}: no block inputs were recorded; did the calibration pass run?")
        self.reference = [self._output(call) for call in self.calls]

    def _output(self, call: tuple[tuple, dict]) -> torch.Tensor:
        out = self.block(*call[0], **call[1])
        out = out[0] if isinstance(out, tuple) else out  # attention returns (output, weights)
        return out.float()

    @torch.no_grad()
    def __call__(self, candidates: list[torch.Tensor]) -> float:
        """``Σ ‖block(x; candidates) − block(x; float weights)‖²`` over the recorded windows."""
        if len(candidates) != len(self.linears):
            raise ValueError(f"{self.name}: {len(candidates)} candidate weights for {len(self.linears)} Linears")
        originals = [lin.weight.data for lin in self.linears]
        try:
            for lin, w in zip(self.linears, candidates):
                lin.weight.data = w.to(lin.weight.dtype)
            return sum(((self._output(c) - ref) ** 2).sum().item() for c, ref in zip(self.calls, self.reference))
        finally:
            for lin, w in zip(self.linears, originals):
                lin.weight.data = w
