"""QAT by distillation: the fake-quantized student learns to match the float teacher's next-token
distributions on calibration windows (KL divergence), as LLM-QAT does, so it adapts to its own
rounding rather than to the calibration text."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmq.qat.prepare import qat_parameters
from llmq.resources import memory_postfix


@dataclass
class DistillResult:
    """Per-step KL(teacher ‖ student) in nats per token, and the wall time."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, steps: int, batch_size: int = 4,
            lr: float = 5e-5, scale_lr: float = 1e-4, temperature: float = 1.0,
            progress: bool = True) -> DistillResult:
    """Train ``student`` (after ``prepare_qat``) for ``steps`` AdamW steps on ``windows`` ``[n, T]``.

    Batches cycle through the windows in order. Only the fake-quantized Linears' weights, biases and
    scales train; every other student parameter (embeddings, norms, head) is frozen, and the teacher
    runs without gradients. ``lr`` is for the latent weights and biases, ``scale_lr`` for the group
    scales (they move on a much larger relative scale per step than the weights need to). The
    defaults (lr 5e-5, scale_lr 1e-4) are the ones chosen on held-out text for SmolLM2-135M int3
    g64 (docs/qat.md).
    """
    weights, scales = qat_parameters(student)
    if not scales:
        raise ValueError("the student has no fake-quantized Linear: call llmq.qat.prepare_qat(model, recipe) first")
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seqlen] token tensor, got {tuple(windows.shape)}")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in weights + scales:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": weights, "lr": lr}, {"params": scales, "lr": scale_lr}], weight_decay=0.0)
    teacher.eval()
    student.train()
    result, start = DistillResult(), time.perf_counter()
    bar = tqdm(range(steps), desc="QAT (distill)", unit="step", disable=not progress)
    device = next(student.parameters()).device
    for step in bar:
        idx = torch.arange(step * batch_size, (step + 1) * batch_size) % windows.shape[0]
        ids = windows[idx].to(device)
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float() / temperature, -1)
        logits = student(input_ids=ids, use_cache=False).logits.float() / temperature
        loss = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean") / ids.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
        bar.set_postfix({"kl": f"{result.losses[-1]:.4f}", **memory_postfix()})
    student.eval()
    result.seconds = time.perf_counter() - start
    return result
