"""Grouped-query attention with RoPE, a causal / sliding-window / padding / segment mask, and an
optional key-value cache. The attention itself is :func:`mixtral_jax.attn.attend` (dense, blockwise,
splash or cuDNN by ``MixtralConfig.attention_impl``).

Masking is by *positions*, not by array index: query i at position q_i may see key j at position p_j
when p_j >= 0 (a real token), p_j <= q_i (causal), q_i - p_j < W (sliding window W, as transformers'
``sliding_window`` mask), and the two share a segment (packed sequences). The same rule serves full
forward passes, left-padded batches, prefill, decode and a rolling cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.attn import attend
from mixtral_jax.config import MixtralConfig
from mixtral_jax.layers import apply_rope, rope_cos_sin
from mixtral_jax.lora import adapters as lora
from mixtral_jax.projection import Projection
from mixtral_jax.sharding.rules import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
  """One layer's (or, stacked, every layer's) keys and values: k/v ``[B, S, K, H]`` (``[L, B, S, K, H]``).

  The slot positions live in :class:`KVCache` because they are shared by all layers.
  """
  k: jax.Array
  v: jax.Array


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
               kept_rows: LayerCache | None = None, lora_key=None):
    """Returns (out_BTD, new_cache).

    ``valid_BT`` marks real tokens (pads are never attended to). Without a cache, keys are this
    call's tokens. With one, the new keys and values are written into slots ``write_slots_BT`` (an
    out-of-range slot means "do not write") of the cache, whose slots hold positions ``cache_pos_BS``
    (-1 when empty).

    Without ``layer`` (one layer's cache ``[B, S, K, H]``; the unrolled reference path) the keys are
    the old slots followed by this call's tokens. With ``layer`` (an int or a traced layer counter),
    ``cache`` is the stacked ``[L, B, S, K, H]`` cache and layer ``layer`` of it is written in place,
    so a donated cache (or a scan's carried one) is never copied whole:
      - T == 1 (decode): the new rows are written straight into the stacked arrays (``kept_rows``,
        this layer's :func:`rows_at_slots`, is what a dropped row rewrites; read here when not given);
      - T > 1 (prefill chunks): layer ``layer`` is cut out, written, and put back (one layer's copy).
    The keys are then the written layer itself, its slots at their updated positions, whenever that is
    exact: always for T == 1 (the slot a new token overwrites held position q - W, outside its window),
    and for T > 1 unless the cache can roll (a chunk's early queries still need the keys its later
    tokens overwrite); then the old layer followed by this call's tokens, as without ``layer``.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x_BTD = x_BTD.astype(dt)
    # x W (+ (drop(x) A) B alpha/r with a LoRA adapter), W dequantised if stored quantized.
    q_BTNH, k_BTKH, v_BTKH = (proj(x_BTD, lora_key) for proj in (self.q, self.k, self.v))
    q_BTNH = constrain(q_BTNH, ("batch", "seq", "act_heads", None))
    cos, sin = rope_cos_sin(positions_BT, cfg.head_size, cfg.rope_theta)
    q_BTNH = apply_rope(q_BTNH, cos, sin)
    k_BTKH = apply_rope(k_BTKH, cos, sin)

    new_pos_BT = positions_BT if valid_BT is None else jnp.where(valid_BT, positions_BT, -1)
    if cache is None:
      keys, values, kv_pos, kv_seg = k_BTKH, v_BTKH, new_pos_BT, segment_ids_BT
      new_cache = None
    else:
      T, S = x_BTD.shape[1], cache_pos_BS.shape[1]
      old = None
      if layer is None:
        old = cache
        new_cache = LayerCache(k=_scatter(cache.k, write_slots_BT, k_BTKH), v=_scatter(cache.v, write_slots_BT, v_BTKH))
      elif T == 1:
        # Write first, then read layer i of the written cache: reading the old buffer while writing it
        # in place has no data dependency to order the two, so XLA would copy the whole stacked cache.
        if kept_rows is None:
          kept_rows = jax.tree.map(lambda a: a[layer], rows_at_slots(cache, write_slots_BT))
        new_cache = _write_row(cache, layer, write_slots_BT, k_BTKH, v_BTKH, kept_rows)
        written = LayerCache(new_cache.k[layer], new_cache.v[layer])
      else:
        # The barrier makes the slice a buffer of its own before the stacked cache is updated: fused
        # into the update's operands, the read and the in-place write of one buffer would make XLA
        # copy the whole stacked cache first (a second cache).
        old = jax.lax.optimization_barrier(LayerCache(cache.k[layer], cache.v[layer]))
        written = LayerCache(k=_scatter(old.k, write_slots_BT, k_BTKH), v=_scatter(old.v, write_slots_BT, v_BTKH))
        # dynamic_update_slice, not .at[layer].set: that is a scatter, bounds-checked by a select that
        # reads (and XLA:CPU converts) the whole stacked cache.
        put = lambda buf, new: jax.lax.dynamic_update_index_in_dim(buf, new, layer, 0)  # noqa: E731
        new_cache = LayerCache(k=put(cache.k, written.k), v=put(cache.v, written.v))
      if layer is not None and (T == 1 or not may_roll(cfg, S)):
        keys, values = written.k.astype(dt), written.v.astype(dt)
        kv_pos = written_positions(cache_pos_BS, write_slots_BT, positions_BT)
      else:
        keys = jnp.concatenate([old.k.astype(dt), k_BTKH], axis=1)
        values = jnp.concatenate([old.v.astype(dt), v_BTKH], axis=1)
        kv_pos = jnp.concatenate([cache_pos_BS, new_pos_BT], axis=1)
      kv_seg = None
    # Without a cache the keys are this call's tokens, whose positions count up by one along each
    # segment for every caller (default positions, packed training batches, cumulative positions of
    # padded batches): a mask by index then equals the mask by position, so index-masking kernels apply.
    out_BTNH = attend(q_BTNH, keys, values, positions_BT, kv_pos,
                      q_seg_BT=segment_ids_BT if kv_seg is not None else None, kv_seg_BS=kv_seg,
                      sliding_window=cfg.sliding_window, impl=cfg.attention_impl, block=cfg.attention_block,
                      index_aligned=cache is None, padded=valid_BT is not None)
    out_BTD = self.o(out_BTNH, lora_key, dt)
    return out_BTD, new_cache


def may_roll(cfg: MixtralConfig, size: int) -> bool:
  """Whether a cache of ``size`` slots can wrap around: only a sliding-window cache of the window's
  size does (any other cache holds every position its sequences reach, see ``init_cache``)."""
  return cfg.sliding_window is not None and size >= cfg.sliding_window


def written_positions(cache_pos_BS, write_slots_BT, positions_BT):
  """The slot positions ``[B, S]`` after writing tokens at ``positions_BT`` into ``write_slots_BT``
  (out-of-range slots are not written)."""
  return jax.vmap(lambda p, s, q: p.at[s].set(q, mode="drop"))(cache_pos_BS, write_slots_BT, positions_BT)


def _scatter(buf_BSKH, write_slots_BT, new_BTKH):
  """One layer's cache with the new rows written into their slots (out-of-range slots dropped)."""
  return jax.vmap(lambda buf, slots, new: buf.at[slots].set(new.astype(buf.dtype), mode="drop"))(
      buf_BSKH, write_slots_BT, new_BTKH)


def rows_at_slots(cache: LayerCache, write_slots_BT) -> LayerCache:
  """k/v ``[L, B, K, H]``: what each row's write slot (clamped to S-1) holds in every layer of the stacked
  cache, for decode (T == 1). A row whose write is dropped rewrites these. Read once before the layer
  loop: reading a slot inside the loop right before updating the same buffer makes XLA copy it whole."""
  slots_B = jnp.minimum(write_slots_BT[:, 0], cache.k.shape[2] - 1)
  rows_B = jnp.arange(slots_B.shape[0])
  return LayerCache(cache.k[:, rows_B, slots_B], cache.v[:, rows_B, slots_B])


def _write_row(cache: LayerCache, layer, write_slots_BT, k_BTKH, v_BTKH, kept: LayerCache) -> LayerCache:
  """The stacked cache with one new row per sequence written into layer ``layer`` (T == 1), in place.

  One ``dynamic_update_slice`` per sequence rather than one scatter: XLA:CPU computes a bfloat16
  scatter in float32, converting the whole stacked cache there and back (a second cache, twice
  over), and a scatter vmapped over the batch makes it lay the cache out batch-major (a transposed
  copy). A "drop" slot (S) rewrites slot S-1 with its own contents ``kept`` ([B, K, H] of this layer,
  from :func:`rows_at_slots`) instead."""
  S = cache.k.shape[2]
  slots_B = jnp.minimum(write_slots_BT[:, 0], S - 1)
  keep_B = write_slots_BT[:, 0] == slots_B

  def write(buf_LBSKH, new_BTKH, kept_BKH):
    new_BTKH = new_BTKH.astype(buf_LBSKH.dtype)
    for b in range(new_BTKH.shape[0]):
      row_KH = jnp.where(keep_B[b], new_BTKH[b, 0], kept_BKH[b].astype(buf_LBSKH.dtype))
      buf_LBSKH = jax.lax.dynamic_update_slice(buf_LBSKH, row_KH[None, None, None], (layer, b, slots_B[b], 0, 0))
    return buf_LBSKH

  return LayerCache(k=write(cache.k, k_BTKH, kept.k), v=write(cache.v, v_BTKH, kept.v))
