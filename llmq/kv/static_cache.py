"""A static-shape quantized KV cache: preallocated packed buffers, a branch-free flush, one compiled graph.

``QuantizedStaticCache`` stores exactly what ``QuantizedKVCache`` stores (same recipe, same
codes, same tokens quantized at the same steps), in buffers allocated once for
``max_cache_len`` tokens, so a decode step has fixed shapes and no data-dependent Python
control flow: ``torch.compile(fullgraph=True)`` traces it as one graph, the step count never
triggers a recompile, and CUDA graphs can replay it (transformers' ``generate`` compiles the
forward automatically for a compileable cache on a GPU; ``cache_implementation="static"`` is
the same path with transformers' fp cache).

Per layer (``F = KVRecipe.flush_block``, ``R = residual_length``, ``P = 32 // bits``)::

    k_codes, v_codes   [B, H, Qc / P, D] int32    quantized tokens [0, n_quant), packed along the tokens
    k_scales/zeros     [B, H, Qc / g, D] (keys per channel) or [B, H, Qc, D / g]; fp16 / uint8
    v_scales/zeros     [B, H, Qc, D / g]
    k_res, v_res       [B, H, R + F, D] model dtype, residual window: slot j = token n_quant + j, j < n_res
    n_quant, cumulative_length   0-d int64 tensors (device state, updated in place)

with ``Qc = ceil(max_cache_len / F) * F + F`` (one block of slack: a step that does not flush
still addresses the block after the last, see ``_masked_write``).

A decode step (one new token): ``flush = n_res >= R + F`` as a 0-d bool tensor; the oldest
``F`` residual tokens are quantized every step, and written with ``where(flush, new, old)`` at
``n_quant``; the residual slides by ``F`` under the same ``where``; the new token goes to slot
``n_res``. Quantizing ``F`` tokens per step that are mostly thrown away costs ``O(F·D)`` per
layer against the ``O(T·D)`` bytes attention reads; the slide copies ``R + F`` tokens.

What attention gets:

* llmq's fused attention (``llmq.kv.enable_fused_attention``): the residual buffer tagged with
  the layer; ``llmq.kv.static_attention`` runs the decode kernel over the whole capacity with a
  slot mask built from the device lengths (Triton on CUDA, the pure-torch reference elsewhere).
* any other attention (sdpa, eager): keys and values of ``Qc + R + F`` positions, position
  ``i`` = token ``i`` (quantized part dequantized, then the residual written at ``n_quant``);
  ``get_mask_sizes`` reports that length, so transformers' causal mask hides every position
  after the current token — this dequantizes the whole capacity every step: correct, not fast.

Prefill (several tokens) runs eagerly (transformers never compiles it) with the dynamic cache's
semantics: it attends over the history plus the new tokens unquantized, then quantizes every
whole block beyond the residual window.

Not supported (raise): sliding-window layers, ``crop`` (assisted decoding), writing past
``max_cache_len`` (checked in prefill; a decode step past it is an index error).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer

from llmq.kernels.kv_attention import PackedKV
from llmq.kv.cache import ATTN_IMPLEMENTATION, HANDLE_ATTR, KVMemory, _text_config, head_dim_of, layer_kinds
from llmq.quant.kv import QuantizedKVBlock, dequantize_kv, kv_block_nbytes, quantize_per_channel, quantize_per_token
from llmq.quant.packing import codes_per_word
from llmq.recipes import KVAxis, KVRecipe


def _masked_write(buf: torch.Tensor, start: torch.Tensor, new: torch.Tensor, do: torch.Tensor) -> None:
    """``buf[:, :, start : start + n] = new`` where ``do`` (0-d bool), else unchanged; ``start`` a 0-d tensor.

    Both cases read and write the same rows, so the graph has one shape whatever ``do`` is.
    """
    idx = start + torch.arange(new.shape[2], device=buf.device)
    buf.index_copy_(2, idx, torch.where(do, new, buf.index_select(2, idx)))


class QuantizedStaticLayer(StaticLayer):
    """One decoder layer's quantized K/V in static buffers (module docstring)."""

    is_compileable = True
    is_croppable = False
    is_sliding = False
    static_shape = True  # llmq.kv.attention: lengths live in device tensors (llmq.kv.static_attention)

    def __init__(self, recipe: KVRecipe, max_cache_len: int, fused) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.recipe = recipe
        self._fused = fused  # () -> bool: does the model attend through llmq's kernel?
        self.block = recipe.flush_block
        self.res_capacity = recipe.residual_length + self.block
        self.quant_capacity = -(-max_cache_len // self.block) * self.block + self.block
        self.n_quant = torch.tensor(0, dtype=torch.int64)

    @property
    def key_per_channel(self) -> bool:
        return self.recipe.key_axis is KVAxis.CHANNEL

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        r, qc = self.recipe, self.quant_capacity
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim = self.v_head_dim = d = key_states.shape[-1]
        b, h, g = self.batch_size, self.num_heads, r.group_size

        def zeros(*shape, dtype):
            return torch.zeros(b, h, *shape, dtype=dtype, device=self.device)

        self.k_codes = zeros(qc // codes_per_word(r.bits), d, dtype=torch.int32)
        self.v_codes = zeros(qc // codes_per_word(r.bits), d, dtype=torch.int32)
        k_param = (qc // g, d) if self.key_per_channel else (qc, d // g)
        self.k_scales = zeros(*k_param, dtype=torch.float16)
        self.v_scales = zeros(qc, d // g, dtype=torch.float16)
        self.k_zeros = None if r.symmetric else zeros(*k_param, dtype=torch.uint8)
        self.v_zeros = None if r.symmetric else zeros(qc, d // g, dtype=torch.uint8)
        self.keys = zeros(self.res_capacity, d, dtype=self.dtype)  # the residual window
        self.values = zeros(self.res_capacity, d, dtype=self.dtype)
        self.n_quant = self.n_quant.to(self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: no recompiles, CUDA graphs replay them
            for t in self._buffers():
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _buffers(self):
        return [t for t in (self.k_codes, self.v_codes, self.k_scales, self.v_scales, self.k_zeros, self.v_zeros,
                            self.keys, self.values, self.n_quant, self.cumulative_length) if t is not None]

    # -- writing -------------------------------------------------------------------------------
    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[QuantizedKVBlock, QuantizedKVBlock]:
        r = self.recipe
        quant_k = quantize_per_channel if self.key_per_channel else quantize_per_token
        return (quant_k(k, r.bits, r.group_size, r.symmetric),
                quantize_per_token(v, r.bits, r.group_size, r.symmetric))

    def _write_quantized(self, start: torch.Tensor, qk: QuantizedKVBlock, qv: QuantizedKVBlock,
                         do: torch.Tensor) -> None:
        """Write the blocks for tokens ``[start, start + n)`` (``start`` a multiple of ``F``) where ``do``."""
        r, p = self.recipe, codes_per_word(self.recipe.bits)
        k_row = start // r.group_size if self.key_per_channel else start
        _masked_write(self.k_codes, start // p, qk.codes, do)
        _masked_write(self.v_codes, start // p, qv.codes, do)
        _masked_write(self.k_scales, k_row, qk.scales, do)
        _masked_write(self.v_scales, start, qv.scales, do)
        if not r.symmetric:
            _masked_write(self.k_zeros, k_row, qk.zeros, do)
            _masked_write(self.v_zeros, start, qv.zeros, do)

    def _decode_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Flush one block if the window is full, then append one token; tensors only, no branches."""
        f = self.block
        n_res = self.cumulative_length - self.n_quant
        do = n_res >= self.recipe.residual_length + f  # 0-d bool on the device
        qk, qv = self._quantize(self.keys[:, :, :f], self.values[:, :, :f])
        self._write_quantized(self.n_quant, qk, qv, do)
        self.keys.copy_(torch.where(do, self.keys.roll(-f, dims=2), self.keys))
        self.values.copy_(torch.where(do, self.values.roll(-f, dims=2), self.values))
        slot = (n_res - do.long() * f).reshape(1)
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.n_quant.add_(do.long() * f)
        self.cumulative_length.add_(1)

    def _prefill_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Several tokens (eager: reads the lengths): attention view first, then quantize whole blocks."""
        n_quant, total = int(self.n_quant), int(self.cumulative_length)
        n_res, q_len = total - n_quant, key_states.shape[2]
        if total + q_len > self.max_cache_len:
            raise ValueError(f"QuantizedStaticCache holds {self.max_cache_len} tokens (max_cache_len); "
                             f"{total} cached + {q_len} new do not fit: build it with a larger max_cache_len")
        k = torch.cat([self.keys[:, :, :n_res], key_states], dim=2)
        v = torch.cat([self.values[:, :, :n_res], value_states], dim=2)
        view = self._dense_view(k, v)
        r, f = self.recipe, self.block
        n = max(0, (k.shape[2] - r.residual_length) // f * f)
        if n:
            qk, qv = self._quantize(k[:, :, :n], v[:, :, :n])
            self._write_quantized(self.n_quant.clone(), qk, qv, torch.tensor(True, device=self.device))
        keep = k.shape[2] - n
        self.keys[:, :, :keep] = k[:, :, n:]
        self.values[:, :, :keep] = v[:, :, n:]
        self.n_quant.add_(n)
        self.cumulative_length.add_(q_len)
        return view

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H_kv, q_len, D]`` states; return what attention should use (module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[2] != 1:
            return self._prefill_step(key_states, value_states)
        self._decode_step(key_states, value_states)
        if self._fused():
            handle = self.keys.view_as(self.keys)  # a fresh tensor object carrying the layer
            setattr(handle, HANDLE_ATTR, self)
            return handle, self.values
        return self._dense_view(self.keys, self.values)

    # -- reading -------------------------------------------------------------------------------
    def _dense_view(self, k_res: torch.Tensor, v_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, Qc + R + F, D]`` in the model dtype, position = token: the quantized
        buffers dequantized, then ``k_res`` written from position ``n_quant`` (the caller's mask hides the
        positions after the current token)."""
        k, v = dequantized_static(self.packed())
        pad = k.new_zeros(*k.shape[:2], self.res_capacity, k.shape[3])
        k, v = torch.cat([k, pad], dim=2).to(self.dtype), torch.cat([v, pad], dim=2).to(self.dtype)
        idx = self.n_quant + torch.arange(k_res.shape[2], device=self.device)
        return k.index_copy(2, idx, k_res), v.index_copy(2, idx, v_res)

    def packed(self) -> PackedKV:
        """The whole quantized capacity as a ``PackedKV`` (``n_quant`` = capacity; the valid count is the
        tensor ``self.n_quant``), residual = the whole window buffer (``self.cumulative_length - n_quant``
        slots valid)."""
        r = self.recipe
        return PackedKV(k_codes=self.k_codes, k_scales=self.k_scales, k_zeros=self.k_zeros,
                        v_codes=self.v_codes, v_scales=self.v_scales, v_zeros=self.v_zeros,
                        n_quant=self.quant_capacity, k_res=self.keys, v_res=self.values, bits=r.bits,
                        group_size=r.group_size, key_per_channel=self.key_per_channel, symmetric=r.symmetric)

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.quant_capacity + self.res_capacity, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def memory(self) -> KVMemory:
        """Used bytes (the same count as ``QuantizedKVCache``'s at the same length) and allocated bytes."""
        if not self.is_initialized:
            return KVMemory(0, 0, 0, 0, 0)
        r = self.recipe
        n_quant, total = int(self.n_quant), int(self.cumulative_length)
        b, h, _, d = self.keys.shape
        used = (kv_block_nbytes(n_quant, b, h, d, r.bits, r.group_size, self.key_per_channel, r.symmetric)
                + kv_block_nbytes(n_quant, b, h, d, r.bits, r.group_size, False, r.symmetric)
                + 2 * b * h * (total - n_quant) * d * self.keys.element_size())
        reserved = sum(t.numel() * t.element_size() for t in self._buffers()[:-2])
        return KVMemory(used, reserved, 2 * b * h * total * d * 2, total, n_quant)

    # -- generate() housekeeping -----------------------------------------------------------------
    def reset(self) -> None:
        if self.is_initialized:
            for t in self._buffers():
                t.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QuantizedStaticCache cannot be cropped (assisted / speculative decoding): "
                                  "use llmq.QuantizedKVCache, which can")

    def _map_batch(self, fn) -> None:
        for name in ("k_codes", "v_codes", "k_scales", "v_scales", "k_zeros", "v_zeros", "keys", "values"):
            if getattr(self, name, None) is not None:
                setattr(self, name, fn(getattr(self, name)).contiguous())
        self.batch_size = self.keys.shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row (eager, before compiling: the buffers are reallocated)."""
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in ("k_codes", "v_codes", "k_scales", "v_scales", "k_zeros", "v_zeros", "keys", "values"):
                t = getattr(self, name)
                if t is not None:
                    t.copy_(t.index_select(0, beam_idx.to(t.device)))


def dequantized_static(kv: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 keys and values ``[B, H, Qc, D]`` of the whole quantized capacity (invalid rows included)."""
    k = dequantize_kv(QuantizedKVBlock(kv.k_codes, kv.k_scales, kv.k_zeros), kv.bits, kv.group_size,
                      kv.key_per_channel)
    v = dequantize_kv(QuantizedKVBlock(kv.v_codes, kv.v_scales, kv.v_zeros), kv.bits, kv.group_size, False)
    return k, v


class QuantizedStaticCache(Cache):
    """Static-shape int2/4/8 KV cache for compiled decoding (``torch.compile``, CUDA graphs).

    Usage::

        cache = llmq.QuantizedStaticCache(model.config, max_cache_len=4096, bits=4)
        model.generate(**inputs, cache=cache, max_new_tokens=256)   # compiled forward on CUDA

    Same recipe, same quantized tokens and same ``memory().used_bytes`` as ``QuantizedKVCache`` at
    the same length (tested); buffers for ``max_cache_len`` tokens are allocated at the first
    forward. Every layer must be full attention.

    Args:
        config: the model's config.
        max_cache_len: most tokens (prompt + generated) the cache holds.
        bits, key_axis, group_size, residual_length, symmetric, recipe: as ``QuantizedKVCache``.
    """

    def __init__(self, config, max_cache_len: int, bits: int = 4, key_axis: str | KVAxis = KVAxis.CHANNEL,
                 group_size: int = 64, residual_length: int = 128, symmetric: bool = False,
                 recipe: KVRecipe | None = None) -> None:
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self.recipe = recipe if recipe is not None else KVRecipe(
            bits=bits, key_axis=key_axis, group_size=group_size, symmetric=symmetric,
            residual_length=residual_length)
        cfg = _text_config(config)
        self.recipe.check_head_dim(head_dim_of(cfg))
        if set(layer_kinds(cfg)) != {"full_attention"}:
            raise ValueError("QuantizedStaticCache supports models whose layers are all full attention; this one has "
                             "sliding-window layers: use llmq.QuantizedKVCache (dynamic), which keeps them in "
                             "transformers' window cache")
        self._config = cfg
        self._max_cache_len = max_cache_len
        super().__init__(layers=[QuantizedStaticLayer(self.recipe, max_cache_len, self.uses_fused_attention)
                                 for _ in range(cfg.num_hidden_layers)])

    @property
    def max_cache_len(self) -> int:
        # a property, not an attribute: transformers 5.17's Cache defines a read-only (deprecated) one
        return self._max_cache_len

    def uses_fused_attention(self) -> bool:
        return getattr(self._config, "_attn_implementation", None) == ATTN_IMPLEMENTATION

    def memory(self) -> KVMemory:
        per = [layer.memory() for layer in self.layers]
        return KVMemory(sum(m.used_bytes for m in per), sum(m.reserved_bytes for m in per),
                        sum(m.fp16_bytes for m in per), per[0].tokens, per[0].quantized_tokens)
