"""Which keyword a model's ``forward``/``generate`` takes for its cache.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until
6.0); llmq supports 5.17+, so callers ask the model instead of hard-coding one::

    model.generate(**inputs, **{cache_kwarg(model): QuantizedKVCache(model.config, bits=4)})
"""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """``"cache"`` if ``model.forward`` takes ``cache=``, else ``"past_key_values"``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
