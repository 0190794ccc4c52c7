"""Blockwise (flash) attention in pure JAX: exact, O(T * block) memory, skipping masked-out blocks.

Forward, per query block i (a ``lax.scan`` over query blocks), over only the key blocks j that
:func:`mixtral_jax.attn.mask.live_blocks` keeps (a ``fori_loop`` with a data-dependent trip count over
block i's live list), the online softmax of Milakov & Gimelshein / Rabe & Staats, statistics in float32:

  s    = q_i k_j^T / sqrt(H), masked entries -inf
  m'   = max(m, rowmax s);  a = exp(m - m');  p = exp(s - m')
  l    = a l + rowsum p;    acc = a acc + p v_j
  out_i = acc / l;  lse_i = m + log l   (the row's log-sum-exp, saved for the backward)

Backward (custom VJP), recomputing p per live block pair instead of saving it:

  p = exp(s - lse);  dv_j += p^T do_i;  dp = do_i v_j^T;  ds = p (dp - rowsum(do_i * out_i))
  dq_i += ds k_j / sqrt(H);  dk_j += ds^T q_i / sqrt(H)

Query heads stay grouped ``[K, G]`` against their kv head, so K/V are never repeated. A query that sees
no key gets output 0 and no gradient (dense attention gives it the mean of all values; neither is ever
used). T and S need not be multiples of the block: queries are padded with copies of the last
position, keys with position -1 (invisible), and the padding is cut off again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax.attn.mask import live_blocks, visible

DEFAULT_BLOCK = 512

_f32 = jnp.float32


def blockwise_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None, *,
                        sliding_window=None, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> jax.Array:
  """Attention of ``q`` ``[B, T, N, H]`` over ``k, v`` ``[B, S, K, H]`` under the position/segment/window
  mask (:mod:`mixtral_jax.attn.mask`); same result as dense attention wherever a query sees a key."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  if (q_seg_BT is None) != (kv_seg_BS is None):
    raise ValueError("segment ids must be given for both queries and keys, or for neither")
  tq, tk = min(block_q, T), min(block_k, S)
  nq, nk = -(-T // tq), -(-S // tk)
  pad_q, pad_k = nq * tq - T, nk * tk - S

  def pad(x, n, **kw):
    return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2), **kw) if n else x

  q_pos = pad(q_pos_BT.astype(jnp.int32), pad_q, mode="edge")
  kv_pos = pad(kv_pos_BS.astype(jnp.int32), pad_k, constant_values=-1)
  if q_seg_BT is None:
    q_seg, kv_seg = jnp.zeros_like(q_pos), jnp.zeros_like(kv_pos)
  else:
    q_seg = pad(q_seg_BT.astype(jnp.int32), pad_q, mode="edge")
    kv_seg = pad(kv_seg_BS.astype(jnp.int32), pad_k, constant_values=0)

  # Blocks first (the loop axes), then [B, K, G, rows, H] inside a block.
  q_nBKGqH = pad(q_BTNH, pad_q).reshape(B, nq, tq, K, G, H).transpose(1, 0, 3, 4, 2, 5)
  k_nBKkH = pad(k_BSKH, pad_k).reshape(B, nk, tk, K, H).transpose(1, 0, 3, 2, 4)
  v_nBKkH = pad(v_BSKH, pad_k).reshape(B, nk, tk, K, H).transpose(1, 0, 3, 2, 4)
  q_pos_nBq, q_seg_nBq = (x.reshape(B, nq, tq).transpose(1, 0, 2) for x in (q_pos, q_seg))
  kv_pos_nBk, kv_seg_nBk = (x.reshape(B, nk, tk).transpose(1, 0, 2) for x in (kv_pos, kv_seg))

  live_QK = live_blocks(q_pos.reshape(B, nq, tq), kv_pos.reshape(B, nk, tk), sliding_window=sliding_window,
                        q_seg_BnQ=None if q_seg_BT is None else q_seg.reshape(B, nq, tq),
                        kv_seg_BnK=None if q_seg_BT is None else kv_seg.reshape(B, nk, tk))
  # Block i visits key blocks order[i, :count[i]], the live ones in increasing order.
  order_QK = jnp.argsort(~live_QK, axis=1, stable=True).astype(jnp.int32)
  count_Q = live_QK.sum(1).astype(jnp.int32)

  out_nBKGqH = _flash(sliding_window, q_nBKGqH, k_nBKkH, v_nBKkH, q_pos_nBq, kv_pos_nBk, q_seg_nBq, kv_seg_nBk,
                      order_QK, count_Q)
  out_BTNH = out_nBKGqH.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * tq, N, H)
  return out_BTNH[:, :T]


def _block_logits(window, q_BKGqH, k_BKkH, qp_Bq, kp_Bk, qs_Bq, ks_Bk):
  """Scaled float32 logits of one block pair, -inf where the mask hides a key."""
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_BKGqH, k_BKkH, preferred_element_type=_f32) * (q_BKGqH.shape[-1] ** -0.5)
  ok_Bqk = visible(qp_Bq[:, :, None], kp_Bk[:, None, :], sliding_window=window, q_seg=qs_Bq[:, :, None],
                   kv_seg=ks_Bk[:, None, :])
  return jnp.where(ok_Bqk[:, None, None], s, -jnp.inf)


def _forward(window, q, k, v, q_pos, kv_pos, q_seg, kv_seg, order, count):
  """(out [nq, B, K, G, tq, H] in q's dtype, lse [nq, B, K, G, tq] float32)."""

  def one_query_block(_, xs):
    q_i, qp_i, qs_i, order_i, count_i = xs

    def visit(t, carry):
      m, l, acc = carry
      j = order_i[t]
      s = _block_logits(window, q_i, k[j], qp_i, kv_pos[j], qs_i, kv_seg[j])
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
      p = jnp.exp(s - m_safe[..., None])
      a = jnp.exp(m - m_safe)
      l = a * l + p.sum(-1)
      acc = a[..., None] * acc + jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v[j],
                                            preferred_element_type=_f32)
      return m_new, l, acc

    stat = q_i.shape[:-1]
    init = (jnp.full(stat, -jnp.inf, _f32), jnp.zeros(stat, _f32), jnp.zeros(q_i.shape, _f32))
    m, l, acc = jax.lax.fori_loop(0, count_i, visit, init)
    empty = l == 0
    l_safe = jnp.where(empty, 1.0, l)
    out = (acc / l_safe[..., None]).astype(q.dtype)
    lse = jnp.where(empty, 0.0, m + jnp.log(l_safe))  # 0, not -inf: exp(-inf - lse) stays 0 in the backward
    return None, (out, lse)

  _, (out, lse) = jax.lax.scan(one_query_block, None, (q, q_pos, q_seg, order, count))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(window, q, k, v, q_pos, kv_pos, q_seg, kv_seg, order, count):
  return _forward(window, q, k, v, q_pos, kv_pos, q_seg, kv_seg, order, count)[0]


def _flash_fwd(window, q, k, v, q_pos, kv_pos, q_seg, kv_seg, order, count):
  out, lse = _forward(window, q, k, v, q_pos, kv_pos, q_seg, kv_seg, order, count)
  return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, order, count, out, lse)


def _flash_bwd(window, res, dout):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, order, count, out, lse = res
  scale = q.shape[-1] ** -0.5
  delta = jnp.sum(dout.astype(_f32) * out.astype(_f32), axis=-1)  # rowsum(do * out) [nq, B, K, G, tq]

  def one_query_block(carry, xs):
    dk, dv = carry
    q_i, do_i, lse_i, delta_i, qp_i, qs_i, order_i, count_i = xs

    def visit(t, c):
      dq, dk, dv = c
      j = order_i[t]
      s = _block_logits(window, q_i, k[j], qp_i, kv_pos[j], qs_i, kv_seg[j])
      p = jnp.exp(s - lse_i[..., None])
      dv = dv.at[j].add(jnp.einsum("bkgqs,bkgqh->bksh", p.astype(do_i.dtype), do_i, preferred_element_type=_f32))
      dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v[j], preferred_element_type=_f32)
      ds = (p * (dp - delta_i[..., None])).astype(q.dtype)
      dq = dq + jnp.einsum("bkgqs,bksh->bkgqh", ds, k[j], preferred_element_type=_f32) * scale
      dk = dk.at[j].add(jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=_f32) * scale)
      return dq, dk, dv

    dq, dk, dv = jax.lax.fori_loop(0, count_i, visit, (jnp.zeros(q_i.shape, _f32), dk, dv))
    return (dk, dv), dq.astype(q.dtype)

  zeros_k = jnp.zeros(k.shape, _f32)
  (dk, dv), dq = jax.lax.scan(one_query_block, (zeros_k, zeros_k),
                              (q, dout, lse, delta, q_pos, q_seg, order, count))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
