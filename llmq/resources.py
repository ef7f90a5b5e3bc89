"""Process memory readings for progress bars and reports (host RSS, CUDA peak)."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (10^6 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def memory_postfix() -> dict[str, str]:
    """Short ``{"rss": ..., "peak": ..., ["cuda": ...]}`` strings for a tqdm postfix."""
    out = {"rss": f"{current_rss_mb():.0f}MB", "peak": f"{peak_rss_mb():.0f}MB"}
    if torch.cuda.is_available():
        out["cuda"] = f"{torch.cuda.max_memory_allocated() / 1e6:.0f}MB"
    return out
