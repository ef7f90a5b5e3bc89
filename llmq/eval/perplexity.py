"""Perplexity over fixed, non-overlapping windows (the ``shared/PEERS.md`` protocol).

The text is tokenized without special tokens (no BOS), truncated to
``max_tokens``, and cut into consecutive windows of ``window`` tokens (a short
last window is kept); each window is scored independently and
``perplexity = exp(mean NLL over all predicted tokens)`` (``window - 1``
predictions per full window).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens evaluated (inputs)
    predicted: int  # tokens whose NLL was averaged
    nll: float  # mean negative log-likelihood (nats)
    window: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str | None = None,
    max_tokens: int | None = 16384,
    window: int = 512,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: the held-out BBC evaluation text).

    Args:
        model: a causal LM (``transformers`` ``PreTrainedModel``), any device.
        max_tokens: evaluate the first this-many tokens (``None`` = all).
        window: tokens per independent window.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if text is None:
        from llmq.data.bbc import eval_text

        text = eval_text()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"text has {ids.numel()} token(s); perplexity needs at least 2")
    device = next(model.parameters(), next(model.buffers())).device
    total_nll, predicted = 0.0, 0
    start = time.perf_counter()
    windows = list(torch.split(ids, window))
    if windows[-1].numel() < 2:  # a 1-token tail predicts nothing
        windows = windows[:-1]
    for chunk in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        x = chunk[None].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total_nll += float(nll)
        predicted += x.shape[1] - 1
    mean = total_nll / predicted
    return PerplexityResult(math.exp(mean), int(ids.numel()), predicted, mean, window,
                            time.perf_counter() - start)
