"""Where work runs: one check of a device name for every command and API call that takes one.

``resolve_device("auto" | None | "cpu" | "cuda" | "cuda:N")`` returns a ``torch.device`` or raises
``ValueError`` naming the problem and the fix: a name torch does not know, another device type
(llmq runs on CPU and CUDA), CUDA asked for where torch sees no GPU, or a GPU index beyond the
visible ones. Without this, each failure surfaced later and differently (torch's
``AssertionError: Torch not compiled with CUDA enabled``, a ``RuntimeError``, or RTN quietly
running on the CPU).
"""

from __future__ import annotations

DEVICE_HELP = "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(name=None):
    """``torch.device`` for ``name``; ``None`` and ``"auto"`` mean CUDA when available, else CPU."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name: use {DEVICE_HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: llmq runs on CPU and CUDA only; use {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {name!r}: CUDA is not available ({why}); use --device cpu (or 'auto')")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA GPU(s) are visible (cuda:0 … cuda:{count - 1}); "
                             f"pick one of those")
    return device
