"""Memory-bandwidth references for the GPU benchmarks: the nominal peak and a measured copy.

Bandwidth-bound kernels (decode GEMV, KV-cache attention) are judged by the bytes they must read
over their time, as a fraction of what the device can move. Both benchmark scripts
(``scripts/bench_kernels.py``, ``scripts/bench_kv_attention.py``) report it against the
datasheet peak and against a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import torch

# nominal peak DRAM bandwidth, GB/s, by device-name fragment (first match wins: specific names first)
PEAK_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 NVL": 3900, "H100 PCIe": 2000,
            "H100": 3350, "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "4090": 1008}


def nominal_peak_gbs(device_name: str, fallback: float) -> float:
    """Datasheet DRAM bandwidth (GB/s) of ``device_name``; ``fallback`` for devices not in ``PEAK_GBS``."""
    return next((gbs for frag, gbs in PEAK_GBS.items() if frag in device_name), fallback)


def copy_bandwidth_gbs(device: str = "cuda", nbytes: int = 2**30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.

    Median of ``triton.testing.do_bench`` over copies of ``nbytes`` (default 1 GiB, far beyond L2).
    """
    import triton.testing

    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * nbytes / ms / 1e6
