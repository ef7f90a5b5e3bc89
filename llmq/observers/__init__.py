"""Calibration observers for activation (and weight) ranges.

Usable on their own::

    from llmq.observers import KLObserver
    obs = KLObserver()
    for x in batches:
        obs.observe(x)
    scale = obs.scale()        # fp32, threshold / 127.5

``make_observer(kind, ...)`` builds one from an ``ObserverKind`` (the recipe's
``observer`` field). See ``llmq.observers.base`` for the mapping conventions
(saturated vs unsaturated) and the no-data / all-zero rules.
"""

from __future__ import annotations

from llmq.observers.base import MIN_SCALE, SAFE_SCALE, Observer, scale_from_threshold
from llmq.observers.histogram import HistogramObserver, KLObserver, MSEObserver, PercentileObserver
from llmq.observers.minmax import EMAObserver, MinMaxObserver
from llmq.recipes import ObserverKind

__all__ = [
    "MIN_SCALE", "SAFE_SCALE", "Observer", "scale_from_threshold", "HistogramObserver", "KLObserver",
    "MSEObserver", "PercentileObserver", "EMAObserver", "MinMaxObserver", "make_observer",
]


def make_observer(kind: ObserverKind | str, *, momentum: float = 0.9, percentile: float = 99.9999,
                  bits: int = 8, per_channel: bool = False, axis: int = -1) -> Observer:
    """An observer of the given kind (``minmax | ema | percentile | mse | kl``)."""
    try:
        kind = ObserverKind(kind)
    except ValueError:
        raise ValueError(f"unknown observer {kind!r}: choose one of {[k.value for k in ObserverKind]}") from None
    common = dict(bits=bits, per_channel=per_channel, axis=axis)
    if kind is ObserverKind.MINMAX:
        return MinMaxObserver(**common)
    if kind is ObserverKind.EMA:
        return EMAObserver(momentum, **common)
    if kind is ObserverKind.PERCENTILE:
        return PercentileObserver(percentile, **common)
    if kind is ObserverKind.MSE:
        return MSEObserver(**common)
    return KLObserver(**common)
