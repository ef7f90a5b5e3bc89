"""A ``transformers`` cache that stores keys and values as packed int2/4/8 codes.

Per layer it holds (see ``llmq.quant.kv`` for the packed layout)::

    quantized part   tokens [0, n_quant)      packed codes + fp16 scales (+ uint8 zeros)
    residual window  tokens [n_quant, T)      full precision (model dtype)

Models with sliding-window layers (Gemma-, Qwen2-style ``layer_types``): only the
full-attention layers are quantized; sliding-window layers keep transformers'
full-precision ``DynamicSlidingWindowLayer`` (bounded by the window; see
``layer_kinds``).

Incremental quantization: a token is quantized exactly once, when it leaves the
residual window of the ``residual_length`` most recent tokens; codes are packed
along the tokens, ``P = 32 // bits`` to a word, and per-channel keys need a whole
group of tokens per scale, so tokens leave in blocks of ``KVRecipe.flush_block``
(``group_size`` with ``key_axis='channel'`` (KIVI), otherwise ``P``). Nothing already
quantized is ever re-quantized (transformers' own ``QuantizedCache`` re-quantizes
the whole history at every flush). Storage grows geometrically, so appending is
amortized O(new tokens).

What attention sees at each step:

* a step of several tokens (prefill, chunked scoring): the cache as it was before
  the step (quantized part dequantized) plus the new tokens in full precision;
  afterwards the tokens that left the window are quantized. Prefill therefore
  attends over unquantized K/V.
* a single-token decode step: the window is flushed first, the token appended,
  then attention runs over the quantized part plus the residual window — through
  the fused kernel when the model uses llmq's attention (``llmq.kv.attention``),
  otherwise on dequantized tensors through the model's own attention.
* while nothing is quantized yet (e.g. a residual window longer than the sequence)
  the full-precision tensors are returned unchanged, so outputs equal
  ``DynamicCache``'s exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from llmq.kernels.kv_attention import PackedKV, dequantized_kv
from llmq.quant.kv import QuantizedKVBlock, dequantize_kv, quantize_per_channel, quantize_per_token
from llmq.quant.packing import codes_per_word
from llmq.recipes import KVAxis, KVRecipe

ATTN_IMPLEMENTATION = "llmq_kv"  # name registered with transformers' AttentionInterface
HANDLE_ATTR = "_llmq_kv_layer"  # attribute on the key tensor handed to attention in fused mode


class _Growing:
    """A ``[B, H, capacity, X]`` tensor filled along dim 2 up to ``length``; capacity grows 1.5×."""

    MIN_GROWTH = 64

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        need = self.length + x.shape[2]
        if self.data is None or need > self.data.shape[2]:
            cap = 0 if self.data is None else self.data.shape[2]
            cap = max(need, cap + max(self.MIN_GROWTH, cap // 2))
            new = torch.zeros(*x.shape[:2], cap, *x.shape[3:], dtype=x.dtype, device=x.device)
            if self.length:
                new[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = new
        self.data[:, :, self.length : need] = x
        self.length = need

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` entries (the allocation stays, for the entries written next)."""
        self.length = min(self.length, length)

    def nbytes_used(self) -> int:
        if self.data is None:
            return 0
        return self.data[:, :, : self.length].numel() * self.data.element_size()

    def nbytes_reserved(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def map_batch(self, fn) -> None:
        if self.data is not None:
            self.data = fn(self.data)


@dataclass(frozen=True)
class KVMemory:
    """Memory of a quantized KV cache (all layers).

    ``used_bytes``: codes + scales + zeros of the quantized tokens plus the residual
    window in its dtype — the theoretical footprint. ``reserved_bytes``: what is
    allocated (storage grows ahead of use). ``fp16_bytes``: an fp16 cache of the same
    tokens (``2 * B * H_kv * T * D * 2`` per layer).
    """

    used_bytes: int
    reserved_bytes: int
    fp16_bytes: int
    tokens: int
    quantized_tokens: int

    @property
    def ratio(self) -> float:
        return self.used_bytes / self.fp16_bytes if self.fp16_bytes else float("nan")


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's quantized K/V (see module docstring). ``self.keys``/``self.values``
    hold the full-precision residual window ``[B, H_kv, n_res, D]``."""

    is_croppable = True

    def __init__(self, recipe: KVRecipe, fused) -> None:
        super().__init__()
        self.recipe = recipe
        self._fused = fused  # () -> bool: does the model attend through llmq's kernel?
        self._reset_storage()

    def _reset_storage(self) -> None:
        self.n_quant = 0
        self.k_codes, self.k_scales, self.k_zeros = _Growing(), _Growing(), _Growing()
        self.v_codes, self.v_scales, self.v_zeros = _Growing(), _Growing(), _Growing()

    @property
    def key_per_channel(self) -> bool:
        return self.recipe.key_axis is KVAxis.CHANNEL

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, d)
        self.is_initialized = True

    # -- writing ---------------------------------------------------------------------------
    def _flush(self) -> None:
        """Quantize the tokens that have left the residual window (whole blocks only)."""
        r = self.recipe
        excess = self.keys.shape[2] - r.residual_length
        n = (excess // r.flush_block) * r.flush_block if excess > 0 else 0
        if n == 0:
            return
        quant_k = quantize_per_channel if self.key_per_channel else quantize_per_token
        qk = quant_k(self.keys[:, :, :n], r.bits, r.group_size, r.symmetric)
        qv = quantize_per_token(self.values[:, :, :n], r.bits, r.group_size, r.symmetric)
        for store, blk in ((self.k_codes, qk.codes), (self.k_scales, qk.scales), (self.k_zeros, qk.zeros),
                           (self.v_codes, qv.codes), (self.v_scales, qv.scales), (self.v_zeros, qv.zeros)):
            if blk is not None:
                store.append(blk)
        self.n_quant += n
        # clone: a view would keep the whole old residual allocation alive
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H_kv, q_len, D]`` new states; return what attention should use (module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[2] == 1:
            self._flush()
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
            if self.n_quant == 0:
                return self.keys, self.values
            if self._fused():
                handle = self.keys.view_as(self.keys)  # a fresh tensor object carrying the layer
                setattr(handle, HANDLE_ATTR, self)
                return handle, self.values
            return self.dequantized()
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        out = (self.keys, self.values) if self.n_quant == 0 else self.dequantized()
        self._flush()
        return out

    # -- reading ---------------------------------------------------------------------------
    def packed(self) -> PackedKV:
        """The kernel's view of this layer (buffers, not copies)."""
        r = self.recipe
        if self.n_quant == 0:
            raise RuntimeError("nothing quantized yet: attend over the residual tensors instead")
        return PackedKV(
            k_codes=self.k_codes.data, k_scales=self.k_scales.data,
            k_zeros=None if r.symmetric else self.k_zeros.data,
            v_codes=self.v_codes.data, v_scales=self.v_scales.data,
            v_zeros=None if r.symmetric else self.v_zeros.data,
            n_quant=self.n_quant, k_res=self.keys, v_res=self.values,
            bits=r.bits, group_size=r.group_size, key_per_channel=self.key_per_channel, symmetric=r.symmetric,
        )

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached keys and values ``[B, H_kv, T, D]`` in the model dtype."""
        if self.n_quant == 0:
            return self.keys, self.values
        k, v = dequantized_kv(self.packed())
        return k.to(self.dtype), v.to(self.dtype)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_quant + self.keys.shape[2]

    # -- memory ------------------------------------------------------------------------------
    def _stores(self):
        return (self.k_codes, self.k_scales, self.k_zeros, self.v_codes, self.v_scales, self.v_zeros)

    def memory(self) -> KVMemory:
        if not self.is_initialized:
            return KVMemory(0, 0, 0, 0, 0)
        res = self.keys.numel() * self.keys.element_size() * 2
        b, h, _, d = self.keys.shape
        t = self.get_seq_length()
        return KVMemory(used_bytes=sum(s.nbytes_used() for s in self._stores()) + res,
                        reserved_bytes=sum(s.nbytes_reserved() for s in self._stores()) + res,
                        fp16_bytes=2 * b * h * t * d * 2, tokens=t, quantized_tokens=self.n_quant)

    # -- generate() housekeeping ---------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._reset_storage()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the most recent tokens (assisted / speculative decoding discards rejected drafts).

        ``tokens_to_remove < 0`` removes that many tokens and ``0`` none (transformers 5.x, which
        calls ``crop(0)`` at the end of assisted generation); ``> 0`` is the older API's meaning,
        the number of tokens to keep. A cut inside the residual window just shortens
        it. A cut inside the quantized part keeps the whole flush blocks before it quantized and
        puts the tokens of the cut block back into the residual window as the values attention saw
        (dequantized; with per-channel keys a block shares its scales, so it cannot stay partly
        quantized). Those few tokens are quantized again when they leave the window — the only case
        where a token is quantized twice. Afterwards ``dequantized()`` equals the first ``keep``
        tokens of what it was before (tested).
        """
        if not self.is_initialized or tokens_to_remove == 0:
            return
        t = self.get_seq_length()
        keep = max(0, t + tokens_to_remove) if tokens_to_remove < 0 else min(tokens_to_remove, t)
        if keep >= self.n_quant:
            self.keys = self.keys[:, :, : keep - self.n_quant]
            self.values = self.values[:, :, : keep - self.n_quant]
            return
        r = self.recipe
        q_keep = keep // r.flush_block * r.flush_block
        k_back, v_back = self._dequantized_range(q_keep, keep)
        for store in (self.k_codes, self.v_codes):  # word rows of P tokens; q_keep is a multiple of P
            store.truncate(q_keep // codes_per_word(r.bits))
        for store in (self.v_scales, self.v_zeros):
            store.truncate(q_keep)
        for store in (self.k_scales, self.k_zeros):  # per-channel keys: one row per group of tokens
            store.truncate(q_keep // r.group_size if self.key_per_channel else q_keep)
        self.n_quant = q_keep
        self.keys, self.values = k_back, v_back

    def _dequantized_range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys and values of quantized tokens ``[start, stop)`` (``start`` on a flush-block
        boundary) in the model dtype, ``[B, H_kv, stop - start, D]``."""
        r = self.recipe
        p, g = codes_per_word(r.bits), r.group_size
        words = slice(start // p, -(-stop // p))

        def side(codes, scales, zeros, per_channel):
            rows = slice(start // g, -(-stop // g)) if per_channel else slice(start, stop)
            blk = QuantizedKVBlock(codes.data[:, :, words], scales.data[:, :, rows],
                                   None if r.symmetric else zeros.data[:, :, rows])
            return dequantize_kv(blk, r.bits, g, per_channel, n_tokens=stop - start).to(self.dtype)

        return (side(self.k_codes, self.k_scales, self.k_zeros, self.key_per_channel),
                side(self.v_codes, self.v_scales, self.v_zeros, False))

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for s in self._stores():
            s.map_batch(fn)
        self.keys, self.values = fn(self.keys), fn(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # every stored tensor is per batch row, so beams reorder exactly (no deferred dequantization)
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def layer_kinds(cfg) -> list[str]:
    """``"full_attention"`` or ``"sliding_attention"`` per decoder layer (from ``layer_types``, else a
    ``sliding_window`` on the config means every layer slides, as transformers infers it).

    Full-attention layers get a ``QuantizedKVLayer``. Sliding-window layers keep transformers'
    full-precision ``DynamicSlidingWindowLayer``: they hold at most the window, a bound that does
    not grow with the context, while full-attention layers grow with it. Raises ``ValueError`` for
    other layer kinds (linear attention, chunked attention, ...) and when no layer is full attention.
    """
    n = cfg.num_hidden_layers
    kinds = list(getattr(cfg, "layer_types", None) or
                 (["sliding_attention"] * n if getattr(cfg, "sliding_window", None) else ["full_attention"] * n))
    other = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if other:
        raise ValueError(f"QuantizedKVCache supports full-attention and sliding-window layers; this model also "
                         f"has {other} layers (linear / chunked attention): use transformers' own cache for it")
    if "full_attention" not in kinds:
        raise ValueError("every layer of this model is sliding-window attention, whose cache is bounded by the "
                         "window and stays in full precision here: there is nothing to quantize, use "
                         "transformers' DynamicCache")
    return kinds


def _window_memory(layer: DynamicSlidingWindowLayer) -> KVMemory:
    """A full-precision sliding-window layer: what it holds (at most the window)."""
    if not layer.is_initialized:
        return KVMemory(0, 0, 0, 0, 0)
    held = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return KVMemory(held, held, (layer.keys.numel() + layer.values.numel()) * 2, layer.keys.shape[2], 0)


def head_dim_of(config) -> int:
    cfg = _text_config(config)
    d = getattr(cfg, "head_dim", None)
    return d if d else cfg.hidden_size // cfg.num_attention_heads


class QuantizedKVCache(Cache):
    """KV cache with int2/4/8 keys and values for ``model.generate`` (KIVI-style).

    Usage::

        cache = llmq.QuantizedKVCache(model.config, bits=4)          # keys per channel, values per token
        model.generate(**inputs, cache=cache)                          # past_key_values= before transformers 5.24
        print(cache.memory().ratio)                                    # bytes used / fp16 bytes

    Call ``llmq.kv.enable_fused_attention(model)`` (or pass ``attn_implementation="llmq_kv"``)
    so decode steps read the packed cache through the Triton kernel on CUDA (pure torch
    on CPU); without it the model's own attention runs on dequantized tensors.

    Args:
        config: the model's config (needs ``num_hidden_layers``, heads, ``head_dim``).
        bits, key_axis, group_size, symmetric, residual_length: see ``llmq.recipes.KVRecipe``;
            or pass ``recipe=`` instead.
    """

    def __init__(self, config, bits: int = 4, key_axis: str | KVAxis = KVAxis.CHANNEL, group_size: int = 64,
                 residual_length: int = 128, symmetric: bool = False, recipe: KVRecipe | None = None) -> None:
        self.recipe = recipe if recipe is not None else KVRecipe(
            bits=bits, key_axis=key_axis, group_size=group_size, symmetric=symmetric,
            residual_length=residual_length)
        cfg = _text_config(config)
        self.recipe.check_head_dim(head_dim_of(cfg))
        self._config = cfg
        layers = [QuantizedKVLayer(self.recipe, self.uses_fused_attention) if kind == "full_attention"
                  else DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window)
                  for kind in layer_kinds(cfg)]
        super().__init__(layers=layers)

    def uses_fused_attention(self) -> bool:
        """True when the model attends through llmq's kernel (checked live: the config is shared)."""
        return getattr(self._config, "_attn_implementation", None) == ATTN_IMPLEMENTATION

    def memory(self) -> KVMemory:
        """Bytes used / reserved by all layers, and what an fp16 cache of the same tokens would use
        (sliding-window layers count as held, in full precision; ``tokens`` / ``quantized_tokens`` are
        those of the first quantized layer)."""
        per = [layer.memory() if isinstance(layer, QuantizedKVLayer) else _window_memory(layer)
               for layer in self.layers]
        first = next(m for m, layer in zip(per, self.layers) if isinstance(layer, QuantizedKVLayer))
        return KVMemory(sum(m.used_bytes for m in per), sum(m.reserved_bytes for m in per),
                        sum(m.fp16_bytes for m in per), first.tokens, first.quantized_tokens)
