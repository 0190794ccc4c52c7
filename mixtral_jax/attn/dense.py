"""Dense attention: the whole ``[B, K, G, T, S]`` float32 logits at once. The reference for the other
implementations, and the fastest for short sequences and short caches (one matmul each way, no loop)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.attn.mask import attention_mask


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS) -> jax.Array:
  """softmax(q k^T / sqrt(H) + mask) v, with N/K query heads sharing each kv head (G = N/K).

  The logits and softmax are float32; probabilities are cast to the value dtype before the second
  matmul, as transformers' eager attention does. A query that may see no key (a pad) gets a uniform
  distribution rather than NaN; its output is never used.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  logits_BKGTS = logits_BKGTS * (H ** -0.5)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def dense_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, *,
                    sliding_window=None) -> jax.Array:
  """:func:`dot_product_attention` with the mask of :mod:`mixtral_jax.attn.mask`."""
  mask_BTS = attention_mask(q_pos_BT, kv_pos_BS, sliding_window=sliding_window, q_seg_BT=q_seg_BT,
                            kv_seg_BS=kv_seg_BS)
  return dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
