"""compressed-tensors export of quantized MoE experts, in the layout vLLM's fused-MoE WNA16 loader reads.

vLLM builds one ``FusedMoE`` per MoE block and fills its stacked parameters (``w13_weight_packed``
``[E, H/pack, 2I]``, ``w13_weight_scale`` ``[E, H/g, 2I]``, ``w2_…``) from **per-expert** checkpoint
tensors, transposing them on load (``is_transposed``); the names come from
``FusedMoE.make_expert_params_mapping`` with the model's original checkpoint names
(``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` for Qwen2/3-MoE, ``experts.{e}.w1`` /
``w3`` / ``w2`` under ``block_sparse_moe`` for Mixtral). So each expert is written as three
``pack-quantized`` Linears (K = in, N = out, b = bits, G = K / group)::

    <orig>.experts.<e>.<proj>.weight_packed  int32 [N, K·b/32]   codes of each output row, packed along K
    <orig>.experts.<e>.<proj>.weight_scale   fp16  [N, G]
    <orig>.experts.<e>.<proj>.weight_shape   int64 [2]           (N, K)

(gate = rows 0..I-1 of llmq's gate_up stack, up = rows I..2I-1, down = the down stack). The
original names are not guessed: transformers' own ``revert_weight_conversion`` (what its
``save_pretrained`` runs) is applied to marker tensors whose values say which expert and which
half each output is. The other tensors of the checkpoint are renamed the same way (Mixtral's
``mlp.gate`` -> ``block_sparse_moe.gate``), and the float routers are listed in ``ignore``.

vLLM's compressed-tensors MoE methods take symmetric 4- or 8-bit group-wise weights only
(``CompressedTensorsWNA16MoEMethod`` asserts ``symmetric`` and ``strategy == "group"``), so
anything else is refused before writing.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.quant.packing import pack_bitstream, unpack

ROLES = ("gate", "up", "down")


def check_experts_exportable(modules: dict[str, dict]) -> None:
    """Raise ``ValueError`` for experts vLLM's compressed-tensors MoE kernels cannot run."""
    for name, c in modules.items():
        if c.get("kind") != "quant_experts":
            continue
        if not c["symmetric"] or c["bits"] not in (4, 8) or c["group_size"] is None:
            raise ValueError(f"{name}: vLLM's compressed-tensors MoE kernels run symmetric 4- or 8-bit group-wise "
                             f"experts only, these are {c['bits']}-bit, group {c['group_size']}, symmetric="
                             f"{c['symmetric']}: re-quantize with --sym --bits 4 (or 8) --group 128 (or 32/64)")
        for what, k in (("hidden_size", c["hidden_size"]), ("intermediate_size", c["intermediate_size"])):
            if k % c["group_size"]:
                raise ValueError(f"{name}: {what} {k} is not a multiple of group size {c['group_size']}")


def original_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{module-name tensor: checkpoint name}`` as transformers' ``save_pretrained`` would write it."""
    from transformers.core_model_loading import revert_weight_conversion

    markers = {n: torch.tensor([float(i)]) for i, n in enumerate(names)}
    reverted = revert_weight_conversion(model, markers)
    out = {names[int(t.item())]: k for k, t in reverted.items()}
    if len(out) != len(names):
        raise ValueError("transformers' checkpoint conversion merged plain tensors; cannot export this model")
    return out


def original_expert_names(model: nn.Module, name: str) -> dict[str, list[str]]:
    """``{"gate"|"up"|"down": [per-expert base name (no ``.weight``)]}`` of experts module ``name``."""
    from transformers.core_model_loading import revert_weight_conversion

    from llmq.moe.families import family_of

    experts = model.get_submodule(name)
    family = family_of(experts)
    e = getattr(experts, family.gate_up).shape[0]
    # marker values: gate_up[e, half] = 2e + half (half 0 = gate, 1 = up); down[e] = -(e + 1)
    gate_up = (2 * torch.arange(e)[:, None, None] + torch.arange(2)[None, :, None]).float()
    down = -(torch.arange(e).float() + 1)[:, None, None]
    reverted = revert_weight_conversion(model, {f"{name}.{family.gate_up}": gate_up, f"{name}.{family.down}": down})
    out: dict[str, list[str | None]] = {role: [None] * e for role in ROLES}
    for key, t in reverted.items():
        if t.numel() != 1 or not key.endswith(".weight"):
            raise ValueError(f"{name}: transformers saves {type(experts).__name__} fused ({key} {tuple(t.shape)}); "
                             "vLLM's per-expert loader needs per-expert tensors, which this family has no "
                             "conversion mapping for")
        v = int(t.item())
        role, idx = (("down", -v - 1) if v < 0 else (("gate", "up")[v % 2], v // 2))
        out[role][idx] = key[: -len(".weight")]
    missing = [r for r, names in out.items() if None in names]
    if missing:
        raise ValueError(f"{name}: transformers' reverse conversion gave no per-expert name for {missing}")
    return out  # type: ignore[return-value]


def expert_tensors(name: str, c: dict, f, bases: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of every expert of llmq experts module ``name`` (reading shard ``f``)."""
    bits, i = c["bits"], c["intermediate_size"]
    out = {}
    for stack, k, roles in (("gate_up", c["hidden_size"], (("gate", slice(0, i)), ("up", slice(i, 2 * i)))),
                            ("down", i, (("down", slice(None)),))):
        qweight, scales = f.get_tensor(f"{name}.{stack}.qweight"), f.get_tensor(f"{name}.{stack}.scales")
        for e in range(c["num_experts"]):
            rows = unpack(qweight[e], bits, k).t()  # [N, K] uint8 codes (unsigned: symmetric offset kept)
            for role, sl in roles:
                base = bases[role][e]
                codes = rows[sl].contiguous()
                out[f"{base}.weight_packed"] = pack_bitstream(codes, bits)
                out[f"{base}.weight_scale"] = scales[e].t()[sl].contiguous()
                out[f"{base}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
    return out
