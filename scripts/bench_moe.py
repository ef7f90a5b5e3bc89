"""Time one quantized MoE block: the grouped Triton kernel vs the torch backend vs float experts (CUDA).

Shape of one Qwen3-30B-A3B MoE layer by default (128 experts, hidden 2048, expert intermediate 768,
top-8), int4 group 128 symmetric; random weights and routing (each token draws 8 distinct experts).
For each token count T the three paths run the same inputs; the kernel's output is checked against
the torch backend before it is timed. Prints a table, writes JSON::

    python scripts/bench_moe.py --tokens 1 4 16 64 256 --out moe_bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmq.nn.quant_experts import QuantExpertLinear, QuantExperts  # noqa: E402
from llmq.quant.primitives import quantize_weight  # noqa: E402


def float_experts(gate_up: torch.Tensor, down: torch.Tensor, x, idx, w):
    """transformers' eager experts loop on float weights (the baseline a user starts from)."""
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        t, slot = torch.where(idx == e)
        g, u = (x[t] @ gate_up[e].T).chunk(2, dim=-1)
        out.index_add_(0, t, (torch.nn.functional.silu(g) * u) @ down[e].T * w[t, slot, None])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe.py needs CUDA")
    import triton.testing

    dev, dt = "cuda", torch.float16
    e, h, i = a.experts, a.hidden, a.inter
    gate_up = torch.randn(e, 2 * i, h, device=dev) * 0.02
    down = torch.randn(e, h, i, device=dev) * 0.02
    stacks = [QuantExpertLinear.from_quantized([quantize_weight(w[j], a.bits, a.group, True) for j in range(e)])
              for w in (gate_up, down)]
    qe = QuantExperts(*stacks, torch.nn.SiLU(), "bench").to(dt)
    gate_up, down = gate_up.to(dt), down.to(dt)
    rows = []
    for t in a.tokens:
        x = torch.randn(t, h, device=dev, dtype=dt)
        idx = torch.rand(t, e, device=dev).topk(a.top_k, dim=-1).indices
        w = torch.softmax(torch.randn(t, a.top_k, device=dev), -1).to(dt)
        qe.set_backend("torch")
        ref = qe(x, idx, w)
        ms_torch = triton.testing.do_bench(lambda: qe(x, idx, w), warmup=5, rep=50)
        qe.set_backend("triton")
        out = qe(x, idx, w)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        ms_triton = triton.testing.do_bench(lambda: qe(x, idx, w), warmup=5, rep=50)
        ms_float = triton.testing.do_bench(lambda: float_experts(gate_up, down, x, idx, w), warmup=5, rep=50)
        rows.append({"tokens": t, "triton_ms": ms_triton, "torch_ms": ms_torch, "float_eager_ms": ms_float,
                     "max_rel_err_vs_torch": err})
        print(f"T={t:5d}  triton {ms_triton:8.3f} ms  torch backend {ms_torch:8.3f} ms  float eager "
              f"{ms_float:8.3f} ms  max rel err {err:.2e}")
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                     "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
