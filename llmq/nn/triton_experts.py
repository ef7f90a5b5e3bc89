"""Triton backends for ``QuantExperts``: the grouped dequantize-matmul (``llmq.kernels.moe_grouped``).

* ``"triton"`` — CUDA (compute capability >= 8.0), tried before the torch backend
  (``llmq.backend_choice.EXPERTS``).
* ``"triton-interpret"`` — the same kernel on CPU under ``TRITON_INTERPRET=1``, only when forced
  (tests and debugging).

Per call: pairs sorted by expert and padded to ``BLOCK_M`` blocks (torch ops, no host sync), one
kernel launch for gate_up over every (block, column tile), the activation on ``[T·k, 2I]``, one
launch for down, and the top-k weighted sum — no Python loop over experts.
"""

from __future__ import annotations

import torch

from llmq.backend_choice import EXPERTS, INTERPRET, triton_device_check
from llmq.kernels._launch import ACT_DTYPES
from llmq.kernels.moe_grouped import align_block_size, moe_grouped_matmul
from llmq.nn.expert_backends import ExpertsSpec
from llmq.nn.triton_backend import MIN_CAPABILITY, cuda_capability
from llmq.quant.primitives import effective_group_size

BLOCK_M = 16  # rows (routed pairs) per block: decode batches give an expert a few rows; 16 is tl.dot's minimum


class TritonExpertsBackend:
    name = "triton"

    def can_implement(self, spec: ExpertsSpec) -> tuple[bool, str]:
        if spec.act_dtype not in ACT_DTYPES:
            return False, f"activations must be float16, bfloat16 or float32, got {spec.act_dtype}"
        declined = triton_device_check(spec.device_type, interpret=False)
        if declined:
            return declined
        cap = cuda_capability()
        if cap < MIN_CAPABILITY:
            return False, f"needs compute capability >= {MIN_CAPABILITY}, this GPU has {cap}"
        return True, f"grouped dequantize-matmul Triton kernel, {spec.bits}-bit, CUDA sm_{cap[0]}{cap[1]}"

    def forward(self, module, x, top_k_index, top_k_weights):
        t, k = top_k_index.shape
        e = module.num_experts
        sorted_pairs, expert_ids = align_block_size(top_k_index, e, BLOCK_M)

        def run(stack, a, a_div):
            return moe_grouped_matmul(a, stack.qweight, stack.scales, stack.zero_points, sorted_pairs, expert_ids,
                                      t * k, a_div, stack.bits, effective_group_size(stack.in_features,
                                                                                     stack.group_size), BLOCK_M)

        gate, up = run(module.gate_up, x, k).chunk(2, dim=-1)  # [T*k, I] each
        y = run(module.down, module.act_fn(gate) * up, 1)  # [T*k, H]
        routed = (top_k_index >= 0) & (top_k_index < e)
        w = torch.where(routed, top_k_weights, torch.zeros_like(top_k_weights)).to(y.dtype)
        return (y.view(t, k, -1) * w[..., None]).sum(dim=1).to(x.dtype)


class TritonInterpreterExpertsBackend(TritonExpertsBackend):
    name = INTERPRET

    def can_implement(self, spec: ExpertsSpec) -> tuple[bool, str]:
        if spec.act_dtype not in ACT_DTYPES:
            return False, f"activations must be float16, bfloat16 or float32, got {spec.act_dtype}"
        return triton_device_check(spec.device_type, interpret=True)


EXPERTS.register(TritonExpertsBackend())
EXPERTS.register(TritonInterpreterExpertsBackend())
