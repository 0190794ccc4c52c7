"""Grouped-query attention with RoPE, a causal / sliding-window / padding / segment mask, and an
optional key-value cache. The attention itself is :func:`mixtral_jax.attn.attend` (dense, blockwise,
splash or cuDNN by ``MixtralConfig.attention_impl``).

Masking is by *positions*, not by array index: query i at position q_i may see key j at position p_j
when p_j >= 0 (a real token), p_j <= q_i (causal), q_i - p_j < W (sliding window W, as transformers'
``sliding_window`` mask), and the two share a segment (packed sequences). The same rule serves full
forward passes, left-padded batches, prefill, decode and a rolling cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.attn import attend
from mixtral_jax.config import MixtralConfig
from mixtral_jax.attn.paged import PagedKVCache, paged_layer
from mixtral_jax.kv_cache import LayerCache, NewTokens, write
from mixtral_jax.layers import apply_rope, rope_cos_sin
from mixtral_jax.lora import adapters as lora
from mixtral_jax.projection import Projection
from mixtral_jax.sharding.rules import constrain


class Attention(nnx.Module):
  """q/k/v/o projections stored as [D, N, H], [D, K, H], [D, K, H], [N, H, D] (``mixtral_jax.param_paths``)."""

  q = Projection("q", "btd,dnh->btnh")
  k = Projection("k", "btd,dkh->btkh")
  v = Projection("v", "btd,dkh->btkh")
  # As one [N*H] contraction: a view of o_NHD, where "btnh,nhd" let XLA copy o into [H, N, D] order.
  o = Projection("o", "bti,id->btd", flatten=True)

  def __init__(self, cfg: MixtralConfig, *, rngs: nnx.Rngs, lora_cfg=None):
    for proj in (self.q, self.k, self.v, self.o):
      proj.init(cfg, rngs)
    self.lora = lora.make("attn", cfg, lora_cfg)  # LoRA adapters on q, k, v, o (or None)
    self.cfg = cfg

  def __call__(self, x_BTD, positions_BT, *, valid_BT=None, segment_ids_BT=None,
               cache: LayerCache | None = None, cache_pos_BS=None, write_slots_BT=None, layer=None,
               kept_rows: LayerCache | None = None, lora_key=None, adapter_B=None):
    """Returns (out_BTD, new_cache). ``adapter_B``: each row's adapter in a serving bank (or None).

    ``valid_BT`` marks real tokens (pads are never attended to). Without a cache, keys are this
    call's tokens. With one, the new keys and values are written into slots ``write_slots_BT`` (an
    out-of-range slot means "do not write") of the cache, whose slots hold positions ``cache_pos_BS``
    (-1 when empty).

    Without ``layer`` the cache is one layer's ``[B, S, K, H]`` (the unrolled reference path); with
    ``layer`` (an int or a traced layer counter) it is the stacked ``[L, B, S, K, H]`` cache, written
    in place (``kept_rows``: this layer's :func:`mixtral_jax.kv_cache.rows_at_slots`, for decode). How
    each case writes and what the queries then attend to is :mod:`mixtral_jax.kv_cache`. A paged cache
    (:class:`~mixtral_jax.attn.paged.PagedKVCache`, with ``layer``) is written into its pages and read
    through its page tables instead (:func:`mixtral_jax.attn.paged.paged_layer`).
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x_BTD = x_BTD.astype(dt)
    # x W (+ (drop(x) A) B alpha/r with a LoRA adapter), W dequantised if stored quantized.
    q_BTNH, k_BTKH, v_BTKH = (proj(x_BTD, lora_key, adapter_B=adapter_B) for proj in (self.q, self.k, self.v))
    q_BTNH = constrain(q_BTNH, ("batch", "seq", "act_heads", None))
    cos, sin = rope_cos_sin(positions_BT, cfg.head_size, cfg.rope_theta)
    q_BTNH = apply_rope(q_BTNH, cos, sin)
    k_BTKH = apply_rope(k_BTKH, cos, sin)

    new_pos_BT = positions_BT if valid_BT is None else jnp.where(valid_BT, positions_BT, -1)
    paged = isinstance(cache, PagedKVCache)
    if paged:  # write into layer ``layer``'s pages, attend through the page tables (attn/paged.py)
      out_BTNH, new_cache = paged_layer(cache, layer, q_BTNH, k_BTKH, v_BTKH, positions_BT, valid_BT,
                                        sliding_window=cfg.sliding_window)
    elif cache is None:
      keys, values, kv_pos, kv_seg = k_BTKH, v_BTKH, new_pos_BT, segment_ids_BT
      new_cache = None
    else:  # the write strategy (decode row, prefill chunk, rolling window) is mixtral_jax.kv_cache's
      new = NewTokens(k_BTKH, v_BTKH, positions_BT, new_pos_BT, write_slots_BT)
      new_cache, keys, values, kv_pos = write(cfg, cache, cache_pos_BS, new, dt, layer, kept_rows)
      kv_seg = None
    # Without a cache the keys are this call's tokens, whose positions count up by one along each
    # segment for every caller (default positions, packed training batches, cumulative positions of
    # padded batches): a mask by index then equals the mask by position, so index-masking kernels apply.
    if not paged:
      out_BTNH = attend(q_BTNH, keys, values, positions_BT, kv_pos,
                        q_seg_BT=segment_ids_BT if kv_seg is not None else None, kv_seg_BS=kv_seg,
                        sliding_window=cfg.sliding_window, impl=cfg.attention_impl, block=cfg.attention_block,
                        index_aligned=cache is None, padded=valid_BT is not None)
    out_BTD = self.o(out_BTNH, lora_key, dt, adapter_B)
    return out_BTD, new_cache
