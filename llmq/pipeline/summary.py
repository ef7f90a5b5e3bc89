"""What a quantization run did: one summary for weight-only and W8A8 runs alike (``str()`` is the table)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from torch import nn

from llmq.resources import peak_rss_mb


@dataclass
class QuantizationSummary:
    """What a quantization run did; ``str()`` gives the human-readable table."""

    linears: int
    quantized_params: int
    model_mb_before: float  # the float model as stored (a folder) or as held (a model in memory)
    model_mb_after: float
    linear_mb_before: float  # the quantized Linears in fp32
    linear_mb_after: float  # their packed codes + scales + zeros (W8A8: int8 codes + scales)
    bits_per_weight: float  # effective, scales/zeros included
    seconds: float
    peak_rss_mb: float
    experts_modules: int = 0  # fused MoE expert blocks quantized (their weights are counted above too)
    # per decoder layer, calibrated methods only: experts that fell back for lack of routed tokens
    # {layer: {"fallback": method, "experts": {expert: tokens}}}
    expert_fallbacks: dict = field(default_factory=dict)
    calibration_samples: int = 0  # calibration windows the layers saw
    # W8A8 only (``scheme`` None for weight-only runs)
    scheme: str | None = None  # "dynamic" | "static"
    observer: str | None = None  # static scales' observer
    alpha: float | None = None  # SmoothQuant migration strength, None: no smoothing
    smoothed: int = 0  # Linears whose inputs SmoothQuant rescaled

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.scheme is not None:
            obs = f", observer {self.observer}" if self.observer else ""
            sq = (f"SmoothQuant alpha={self.alpha} on {self.smoothed} Linears" if self.alpha is not None
                  else "no SmoothQuant")
            head = (f"W8A8 {self.scheme}{obs}: {self.linears} Linears -> W8A8Linear, {sq}, "
                    f"{self.calibration_samples} calibration samples, {self.seconds:.1f} s\n")
        else:
            head = (f"quantized {self.linears} linears ({self.quantized_params / 1e6:.1f}M weights) "
                    f"in {self.seconds:.1f} s\n")
        return head + (
            f"  model size     {self.model_mb_before:8.1f} MB -> {self.model_mb_after:8.1f} MB\n"
            f"  linear weights {self.linear_mb_before:8.1f} MB -> {self.linear_mb_after:8.1f} MB "
            f"({self.bits_per_weight:.2f} bits/weight incl. scales and zeros)\n"
            f"  peak RSS       {self.peak_rss_mb:8.1f} MB"
        ) + self._experts_lines()

    def _experts_lines(self) -> str:
        if not self.experts_modules:
            return ""
        lines = [f"\n  MoE            {self.experts_modules} fused expert blocks quantized (included above)"]
        for layer, info in self.expert_fallbacks.items():
            tokens = ", ".join(f"{e}:{t}" for e, t in info["experts"].items())
            lines.append(f"\n    {layer}: {len(info['experts'])} expert(s) below {info['min_tokens']} routed tokens "
                         f"fell back to {info['fallback']} (expert:tokens {tokens})")
        return "".join(lines)


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting tied tensors once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every quantized module's weight storage (codes, scales, zeros; not the bias)."""
    from llmq.nn.quant_experts import QuantExperts
    from llmq.nn.quant_linear import QuantLinear
    from llmq.nn.w8a8_linear import W8A8Linear

    total = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            total += m.storage_bytes()
        elif isinstance(m, W8A8Linear):
            total += sum(b.numel() * b.element_size() for n, b in m.named_buffers(recurse=False) if n != "bias")
    return total


def summarize(model: nn.Module, linears: int, params: int, before_mb: float, start: float, **extra
              ) -> QuantizationSummary:
    """The summary of a finished run: ``linears`` quantized Linears of ``params`` weights in total (experts
    included), ``before_mb`` the float model's size, ``start`` the run's ``time.perf_counter()``."""
    after = quantized_bytes(model)
    return QuantizationSummary(
        linears=linears, quantized_params=params, model_mb_before=before_mb, model_mb_after=model_bytes(model) / 1e6,
        linear_mb_before=params * 4 / 1e6, linear_mb_after=after / 1e6,
        bits_per_weight=8 * after / params if params else 0.0, seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(), **extra)
