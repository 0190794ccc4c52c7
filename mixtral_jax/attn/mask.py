"""The one attention mask rule, by positions, in the forms the implementations need.

Key j is visible to query i when

  kv_pos[j] >= 0              (a real token; -1 marks padding and empty cache slots)
  kv_pos[j] <= q_pos[i]       (causal)
  q_pos[i] - kv_pos[j] < W    (sliding window W, transformers' ``sliding_window``; no limit when None)
  seg[i] == seg[j]            (packed sequences; no limit without segment ids)

:func:`visible` evaluates it elementwise (any broadcastable shapes: a whole ``[B, T, S]`` mask or one
``[B, tq, tk]`` block); :func:`live_blocks` bounds it per block from each block's minimum and maximum
position and segment, so blockwise attention can skip key blocks no query of a query block can see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(q_pos, kv_pos, *, sliding_window=None, q_seg=None, kv_seg=None) -> jax.Array:
  """The rule above for broadcastable ``q_pos`` (e.g. ``[B, T, 1]``) and ``kv_pos`` (``[B, 1, S]``)."""
  ok = (kv_pos >= 0) & (kv_pos <= q_pos)
  if sliding_window is not None:
    ok &= (q_pos - kv_pos) < sliding_window
  if q_seg is not None:
    ok &= q_seg == kv_seg
  return ok


def attention_mask(q_pos_BT, kv_pos_BS, *, sliding_window, q_seg_BT=None, kv_seg_BS=None) -> jax.Array:
  """Boolean ``[B, T, S]``: which keys each query may attend to."""
  return visible(q_pos_BT[:, :, None], kv_pos_BS[:, None, :], sliding_window=sliding_window,
                 q_seg=None if q_seg_BT is None else q_seg_BT[:, :, None],
                 kv_seg=None if kv_seg_BS is None else kv_seg_BS[:, None, :])


def live_blocks(q_pos_BnQ, kv_pos_BnK, *, sliding_window=None, q_seg_BnQ=None, kv_seg_BnK=None) -> jax.Array:
  """Boolean ``[nq, nk]``: False only where no query of query block i sees any key of key block j,
  in any row of the batch.

  Inputs are blocked: ``q_pos_BnQ`` is ``[B, nq, tq]``, ``kv_pos_BnK`` is ``[B, nk, tk]``. A block pair
  is dead when its keys are all padding, all later than the latest query (causal), all at least W
  before the earliest query (window), or when the two blocks' segment ranges do not overlap. These are
  bounds, so a live pair may still hold no visible pair (the exact mask is applied inside the block);
  a dead one never does. With positions equal to the index (possibly restarting per packed segment)
  this keeps about half of the pairs for causal attention and about (W / tk + 1) per query block for a
  window W.
  """
  big = jnp.iinfo(jnp.int32).max
  real = kv_pos_BnK >= 0
  any_real = real.any(-1)  # [B, nk]
  k_min = jnp.where(real, kv_pos_BnK, big).min(-1)
  k_max = jnp.where(real, kv_pos_BnK, -1).max(-1)
  q_min, q_max = q_pos_BnQ.min(-1), q_pos_BnQ.max(-1)  # [B, nq]
  live = any_real[:, None, :] & (k_min[:, None, :] <= q_max[:, :, None])
  if sliding_window is not None:
    live &= (q_min[:, :, None] - k_max[:, None, :]) < sliding_window
  if q_seg_BnQ is not None:
    ks_min = jnp.where(real, kv_seg_BnK, big).min(-1)
    ks_max = jnp.where(real, kv_seg_BnK, -big).max(-1)
    qs_min, qs_max = q_seg_BnQ.min(-1), q_seg_BnQ.max(-1)
    live &= (qs_min[:, :, None] <= ks_max[:, None, :]) & (ks_min[:, None, :] <= qs_max[:, :, None])
  return live.any(0)
