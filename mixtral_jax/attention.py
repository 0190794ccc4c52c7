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
from mixtral_jax.inference.quantize import compute_weight
from mixtral_jax.layers import apply_rope, param, rope_cos_sin
from mixtral_jax.lora import adapters as lora
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
  """q/k/v/o projections stored as [D, N, H], [D, K, H], [D, K, H], [N, H, D]."""

  def __init__(self, cfg: MixtralConfig, *, rngs: nnx.Rngs, lora_cfg=None):
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
    self.q_DNH = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), pd, std=std)
    self.k_DKH = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd, std=std)
    self.v_DKH = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd, std=std)
    self.o_NHD = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), pd, std=std)
    self.lora = lora.make("attn", cfg, lora_cfg)  # LoRA adapters on q, k, v, o (or None)
    self.cfg = cfg

  def __call__(self, x_BTD, positions_BT, *, valid_BT=None, segment_ids_BT=None,
               cache: LayerCache | None = None, cache_pos_BS=None, write_slots_BT=None, layer: int | None = None,
               lora_key=None):
    """Returns (out_BTD, new_cache).

    ``valid_BT`` marks real tokens (pads are never attended to). Without a cache, keys are this
    call's tokens. With one, keys are the cached slots (positions ``cache_pos_BS``, -1 when empty)
    followed by this call's tokens; the new keys and values are then written into slots
    ``write_slots_BT`` (an out-of-range slot means "do not write"). With ``layer``, ``cache`` is the
    stacked ``[L, B, S, K, H]`` cache: layer ``layer`` is read and the new rows are scattered into the
    stacked arrays, so a donated cache is updated in place (no copy of a whole layer). Decode only (T == 1).
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    if layer is not None and x_BTD.shape[1] != 1:
      raise ValueError(f"writing a stacked cache by layer is for one new token per row, got T={x_BTD.shape[1]}")
    x_BTD = x_BTD.astype(dt)
    q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, compute_weight(self, "q_DNH", dt))
    k_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, compute_weight(self, "k_DKH", dt))
    v_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, compute_weight(self, "v_DKH", dt))
    q_BTNH = lora.add(self.lora, "q", x_BTD, q_BTNH, lora_key)  # LoRA: + (drop(x) A) B alpha/r (or no-op)
    k_BTKH = lora.add(self.lora, "k", x_BTD, k_BTKH, lora_key)  # LoRA
    v_BTKH = lora.add(self.lora, "v", x_BTD, v_BTKH, lora_key)  # LoRA
    q_BTNH = constrain(q_BTNH, ("batch", "seq", "act_heads", None))
    cos, sin = rope_cos_sin(positions_BT, cfg.head_size, cfg.rope_theta)
    q_BTNH = apply_rope(q_BTNH, cos, sin)
    k_BTKH = apply_rope(k_BTKH, cos, sin)

    new_pos_BT = positions_BT if valid_BT is None else jnp.where(valid_BT, positions_BT, -1)
    if cache is None:
      keys, values, kv_pos, kv_seg = k_BTKH, v_BTKH, new_pos_BT, segment_ids_BT
      new_cache = None
    else:
      if layer is None:
        old = cache
        scatter = jax.vmap(lambda buf, slots, new: buf.at[slots].set(new.astype(buf.dtype), mode="drop"))
        new_cache = LayerCache(k=scatter(cache.k, write_slots_BT, k_BTKH), v=scatter(cache.v, write_slots_BT, v_BTKH))
      else:
        # Write first, then read layer i of the written cache: reading the old buffer while writing it
        # in place has no data dependency to order the two, so XLA would copy the whole stacked cache.
        # Same result: the written slot keeps its old position in cache_pos_BS, which the new query
        # cannot see (-1 when empty; in a rolling cache of S = W slots it is q - W, outside the window).
        new_cache = _write_layer(cache, layer, write_slots_BT, k_BTKH, v_BTKH)
        old = LayerCache(new_cache.k[layer], new_cache.v[layer])
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
    # As one [N*H] contraction: a view of o_NHD, where "btnh,nhd" let XLA copy o into [H, N, D] order.
    B, T, N, H = out_BTNH.shape
    out_BTD = jnp.einsum("bti,id->btd", out_BTNH.reshape(B, T, N * H), compute_weight(self, "o_NHD", dt).reshape(N * H, -1))
    out_BTD = lora.add(self.lora, "o", out_BTNH, out_BTD, lora_key)  # LoRA
    return out_BTD, new_cache


def _write_layer(cache: LayerCache, layer: int, write_slots_BT, k_BTKH, v_BTKH) -> LayerCache:
  """The stacked cache with one new row per sequence written into layer ``layer`` (T == 1).

  A "drop" slot (S) rewrites slot S-1 with its own contents instead: XLA turns a dropping scatter
  into a select over the whole cache, which is not an in-place update."""
  B = k_BTKH.shape[0]
  rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], write_slots_BT.shape)
  slots_BT = jnp.minimum(write_slots_BT, cache.k.shape[2] - 1)
  keep_BT11 = (write_slots_BT == slots_BT)[..., None, None]

  def write(buf, new):
    old = buf[layer, rows_BT, slots_BT]
    return buf.at[layer, rows_BT, slots_BT].set(jnp.where(keep_BT11, new.astype(buf.dtype), old))

  return LayerCache(k=write(cache.k, k_BTKH), v=write(cache.v, v_BTKH))
