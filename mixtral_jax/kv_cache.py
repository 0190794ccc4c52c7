"""The key-value cache of generation and its write strategies.

The cache holds every layer's keys and values ``[L, B, S, K, H]`` and, per row, the position each
slot holds ``[B, S]`` (-1 when empty). A token at position p lives in slot p % S, so with S equal to
the sliding window the cache rolls, and with S >= the total length it never wraps.

Attention projects and rotates the new keys and values, calls :func:`write`, and attends over what it
returns: (the new cache, the keys, the values, their positions). One function per way of writing:

  - :func:`write_unstacked`: one layer's own cache ``[B, S, K, H]`` (the unrolled reference path); the
    keys are the old slots followed by this call's tokens.
  - :func:`write_decode_row` (T == 1, stacked cache): each row's new key/value goes straight into
    layer ``layer`` of the stacked (donated) cache, in place; the keys are the written layer. Exact:
    the slot a new token overwrites held position q - W, outside its window.
  - :func:`write_prefill_chunk` (T > 1, stacked cache that cannot roll): layer ``layer`` is cut out,
    written and put back (one layer's copy, never the whole cache); the keys are the written layer.
  - :func:`write_rolling_chunk` (T > 1 into a cache that can roll): written the same way, but the
    keys are the old layer followed by this call's tokens, since a chunk's early queries still need
    keys that its later tokens overwrite.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
  """One layer's (or, stacked, every layer's) keys and values: k/v ``[B, S, K, H]`` (``[L, B, S, K, H]``).

  The slot positions live in :class:`KVCache` because they are shared by all layers.
  """
  k: jax.Array
  v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer ``[L, B, S, K, H]`` and the position held by each slot ``[B, S]``
  (-1 when empty); see the module docstring."""
  layers: LayerCache
  pos: jax.Array

  @property
  def size(self) -> int:
    return self.pos.shape[1]


def init_cache(cfg, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (fewer slots with a window)."""
  S = max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window)
  shape = (cfg.num_hidden_layers, batch, S, cfg.num_key_value_heads, cfg.head_size)
  dt = jnp.dtype(dtype or cfg.dtype)
  return KVCache(LayerCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt)), jnp.full((batch, S), -1, jnp.int32))


def may_roll(cfg, size: int) -> bool:
  """Whether a cache of ``size`` slots can wrap around: only a sliding-window cache of the window's
  size does (any other cache holds every position its sequences reach, see :func:`init_cache`)."""
  return cfg.sliding_window is not None and size >= cfg.sliding_window


def write_slots(positions_BT, valid_BT, size: int):
  """Cache slot of each new token: p % S; pads, and tokens that a later token of this call will
  overwrite in a rolling cache, get slot S (dropped)."""
  slots = positions_BT % size
  newest = jnp.max(jnp.where(valid_BT, positions_BT, -1) if valid_BT is not None else positions_BT,
                   axis=1, keepdims=True)
  keep = positions_BT > newest - size
  if valid_BT is not None:
    keep &= valid_BT
  return jnp.where(keep, slots, size).astype(jnp.int32)


def written_positions(cache_pos_BS, write_slots_BT, positions_BT):
  """The slot positions ``[B, S]`` after writing tokens at ``positions_BT`` into ``write_slots_BT``
  (out-of-range slots are not written)."""
  return jax.vmap(lambda p, s, q: p.at[s].set(q, mode="drop"))(cache_pos_BS, write_slots_BT, positions_BT)


def rows_at_slots(cache: LayerCache, write_slots_BT) -> LayerCache:
  """k/v ``[L, B, K, H]``: what each row's write slot (clamped to S-1) holds in every layer of the stacked
  cache, for decode (T == 1). A row whose write is dropped rewrites these. Read once before the layer
  loop: reading a slot inside the loop right before updating the same buffer makes XLA copy it whole."""
  slots_B = jnp.minimum(write_slots_BT[:, 0], cache.k.shape[2] - 1)
  rows_B = jnp.arange(slots_B.shape[0])
  return LayerCache(cache.k[:, rows_B, slots_B], cache.v[:, rows_B, slots_B])


class Written(NamedTuple):
  """What a write returns: the new cache, and the keys/values ``[B, S', K, H]`` (in the compute
  dtype) with their positions ``[B, S']`` that this call's queries attend to."""
  cache: LayerCache
  keys: jax.Array
  values: jax.Array
  positions: jax.Array


@dataclasses.dataclass(frozen=True)
class NewTokens:
  """This call's keys/values ``[B, T, K, H]``, their positions ``[B, T]`` (-1 for pads) and slots."""
  k: jax.Array
  v: jax.Array
  positions: jax.Array
  new_positions: jax.Array
  slots: jax.Array


def write(cfg, cache: LayerCache, cache_pos_BS, new: NewTokens, dtype, layer=None, kept_rows=None) -> Written:
  """Writes ``new`` into ``cache`` by the strategy that fits (see the module docstring)."""
  if layer is None:
    return write_unstacked(cache, cache_pos_BS, new, dtype)
  if new.k.shape[1] == 1:
    return write_decode_row(cache, cache_pos_BS, new, dtype, layer, kept_rows)
  if may_roll(cfg, cache_pos_BS.shape[1]):
    return write_rolling_chunk(cache, cache_pos_BS, new, dtype, layer)
  return write_prefill_chunk(cache, cache_pos_BS, new, dtype, layer)


def write_unstacked(cache: LayerCache, cache_pos_BS, new: NewTokens, dtype) -> Written:
  """One layer's cache ``[B, S, K, H]``: scatter the new rows; attend to the old slots + the new tokens."""
  written = LayerCache(k=_scatter(cache.k, new.slots, new.k), v=_scatter(cache.v, new.slots, new.v))
  return Written(written, *_old_then_new(cache, cache_pos_BS, new, dtype))


def write_decode_row(cache: LayerCache, cache_pos_BS, new: NewTokens, dtype, layer, kept_rows=None) -> Written:
  """T == 1 into layer ``layer`` of the stacked cache, in place; attend to the written layer.

  Write first, then read layer ``layer`` of the written cache: reading the old buffer while writing it
  in place has no data dependency to order the two, so XLA would copy the whole stacked cache.
  ``kept_rows`` (this layer's :func:`rows_at_slots`) is what a dropped row rewrites; read here if not given.
  """
  if kept_rows is None:
    kept_rows = jax.tree.map(lambda a: a[layer], rows_at_slots(cache, new.slots))
  cache = _write_row(cache, layer, new.slots, new.k, new.v, kept_rows)
  return _attend_written(cache, LayerCache(cache.k[layer], cache.v[layer]), cache_pos_BS, new, dtype)


def write_prefill_chunk(cache: LayerCache, cache_pos_BS, new: NewTokens, dtype, layer) -> Written:
  """T > 1 into layer ``layer`` of a stacked cache that cannot roll; attend to the written layer."""
  cache, _, written = _write_layer(cache, new, layer)
  return _attend_written(cache, written, cache_pos_BS, new, dtype)


def write_rolling_chunk(cache: LayerCache, cache_pos_BS, new: NewTokens, dtype, layer) -> Written:
  """T > 1 into layer ``layer`` of a cache that can roll; attend to the old layer + the new tokens."""
  cache, old, _ = _write_layer(cache, new, layer)
  return Written(cache, *_old_then_new(old, cache_pos_BS, new, dtype))


def _write_layer(cache: LayerCache, new: NewTokens, layer):
  """(the stacked cache with layer ``layer`` written, that layer before, after)."""
  # The barrier makes the slice a buffer of its own before the stacked cache is updated: fused into
  # the update's operands, the read and the in-place write of one buffer would make XLA copy the
  # whole stacked cache first (a second cache).
  old = jax.lax.optimization_barrier(LayerCache(cache.k[layer], cache.v[layer]))
  written = LayerCache(k=_scatter(old.k, new.slots, new.k), v=_scatter(old.v, new.slots, new.v))
  # dynamic_update_slice, not .at[layer].set: that is a scatter, bounds-checked by a select that reads
  # (and XLA:CPU converts) the whole stacked cache.
  put = lambda buf, w: jax.lax.dynamic_update_index_in_dim(buf, w, layer, 0)  # noqa: E731
  return LayerCache(k=put(cache.k, written.k), v=put(cache.v, written.v)), old, written


def _attend_written(cache, written: LayerCache, cache_pos_BS, new: NewTokens, dtype) -> Written:
  return Written(cache, written.k.astype(dtype), written.v.astype(dtype),
                 written_positions(cache_pos_BS, new.slots, new.positions))


def _old_then_new(old: LayerCache, cache_pos_BS, new: NewTokens, dtype):
  return (jnp.concatenate([old.k.astype(dtype), new.k], axis=1),
          jnp.concatenate([old.v.astype(dtype), new.v], axis=1),
          jnp.concatenate([cache_pos_BS, new.new_positions], axis=1))


def _scatter(buf_BSKH, write_slots_BT, new_BTKH):
  """One layer's cache with the new rows written into their slots (out-of-range slots dropped)."""
  return jax.vmap(lambda buf, slots, new: buf.at[slots].set(new.astype(buf.dtype), mode="drop"))(
      buf_BSKH, write_slots_BT, new_BTKH)


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

  def one(buf_LBSKH, new_BTKH, kept_BKH):
    new_BTKH = new_BTKH.astype(buf_LBSKH.dtype)
    for b in range(new_BTKH.shape[0]):
      row_KH = jnp.where(keep_B[b], new_BTKH[b, 0], kept_BKH[b].astype(buf_LBSKH.dtype))
      buf_LBSKH = jax.lax.dynamic_update_slice(buf_LBSKH, row_KH[None, None, None], (layer, b, slots_B[b], 0, 0))
    return buf_LBSKH

  return LayerCache(k=one(cache.k, k_BTKH, kept.k), v=one(cache.v, v_BTKH, kept.v))
