"""Paged attention: keys and values in a pool of fixed-size pages, read through a page table per row.

One layer's pool is ``k_pages, v_pages`` ``[P, p, K, H]`` (P pages of p token slots). Row b's token at
position s lives in slot ``s % p`` of page ``table[b, s // p]``; the first ``kv_len[b]`` positions are
filled, the table's unused tail points at page 0 (the null page, see
:mod:`mixtral_jax.inference.pages`).

Write (:func:`write_pages`, decode steps and prefill chunks alike): a scatter of each new token's key
and value to its slot; padding tokens get an index past the pool and ``mode="drop"`` discards them, so
no row ever writes into a page it does not own.

Read (:func:`paged_attention`): the online softmax of :mod:`mixtral_jax.attn.blockwise`, over key
blocks of ``pages_per_block`` pages gathered through the table, never a ``[T, S]`` score matrix:

  for j in live blocks:   k_j, v_j = k_pages[table[:, j]], v_pages[table[:, j]]   ([B, blk, K, H])
    s = q k_j^T / sqrt(H), -inf where key position >= kv_len or the mask rule hides it
    m' = max(m, rowmax s); a = exp(m - m'); l = a l + rowsum exp(s - m'); acc = a acc + exp(s - m') v_j
  out = acc / l   (0 for a query that sees no key: padding rows)

Key positions come from the table index (``j * blk + offset``), not from stored positions. The live
blocks run from the first one a window can reach (``min q_pos - W + 1``) to the last filled one
(``max kv_len``), over the whole batch; the exact mask is applied inside each block. Query heads stay
grouped ``[K, G]`` against their kv head (GQA without repeating K/V). Inference only (no VJP).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mixtral_jax.attn.mask import visible

_f32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
  """The paged cache of every layer as the model's layer scan carries it: pools ``k, v`` ``[L, P, p, K,
  H]``, the rows' page tables ``[B, M]`` and their filled lengths ``kv_len`` ``[B]`` counted after this
  call's writes (the host's :mod:`mixtral_jax.inference.pages` owns which page is whose)."""
  k: jax.Array
  v: jax.Array
  table: jax.Array
  kv_len: jax.Array

  @property
  def page_size(self) -> int:
    return self.k.shape[2]


def init_pools(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype):
  """Zeroed ``k, v`` pools ``[L, P, p, K, H]``."""
  shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def paged_layer(cache: PagedKVCache, layer, q_BTNH, k_BTKH, v_BTKH, positions_BT, valid_BT, *,
                sliding_window=None, pages_per_block: int = 1):
  """One attention layer over the paged cache: this call's keys/values written into layer ``layer``'s
  pages (:func:`write_layer`), then the queries attend through the tables (:func:`paged_attention`,
  reading the written pool). Returns (out ``[B, T, N, H]``, the cache with the written pools)."""
  if valid_BT is None:
    valid_BT = jnp.ones(positions_BT.shape, bool)
  k = write_layer(cache.k, layer, k_BTKH, cache.table, positions_BT, valid_BT)
  v = write_layer(cache.v, layer, v_BTKH, cache.table, positions_BT, valid_BT)
  q_pos_BT = jnp.where(valid_BT, positions_BT, -1)
  out = paged_attention(q_BTNH, k, v, cache.table, q_pos_BT, cache.kv_len, sliding_window=sliding_window,
                        pages_per_block=pages_per_block, layer=layer)
  return out, PagedKVCache(k, v, cache.table, cache.kv_len)


def write_pool(pages_PpKH, x_BTKH, table_BM, pos_BT, valid_BT):
  """One pool ``[P, p, K, H]`` with each valid token's key (or value) stored at its position's slot;
  padding tokens get an index past the pool and are dropped."""
  P, p, K, H = pages_PpKH.shape
  pos = jnp.maximum(pos_BT, 0)
  page_BT = jnp.take_along_axis(table_BM, jnp.minimum(pos // p, table_BM.shape[1] - 1), axis=1)
  flat_BT = jnp.where(valid_BT, page_BT * p + pos % p, P * p)  # P * p: past the pool, dropped
  flat = pages_PpKH.reshape(P * p, K, H).at[flat_BT.reshape(-1)].set(
      x_BTKH.reshape(-1, K, H).astype(pages_PpKH.dtype), mode="drop")
  return flat.reshape(P, p, K, H)


def write_pages(k_pages_PpKH, v_pages_PpKH, k_BTKH, v_BTKH, table_BM, pos_BT, valid_BT):
  """Both pools written by :func:`write_pool` (``pos_BT``: the tokens' positions in their rows,
  ``valid_BT``: which are real). Donate the pools to the surrounding jit so the scatter is in place."""
  return (write_pool(k_pages_PpKH, k_BTKH, table_BM, pos_BT, valid_BT),
          write_pool(v_pages_PpKH, v_BTKH, table_BM, pos_BT, valid_BT))


def write_layer(pool_LPpKH, layer, x_BTKH, table_BM, pos_BT, valid_BT):
  """The stacked pool ``[L, P, p, K, H]`` with this call's keys (or values) written into layer ``layer``
  (an int or a traced layer counter), in place when the pool is donated or carried by a scan.

  Decode (T == 1): one ``dynamic_update_slice`` per row at (layer, page, slot); a padding row writes
  into the null page's slot 0, which no row ever reads unmasked. (XLA:CPU computes a bfloat16 scatter
  in float32 over the whole operand, so the stacked pool is never a scatter's operand.) Prefill chunks
  (T > 1): the layer is cut out, written with :func:`write_pool`'s scatter, and put back.
  """
  L, P, p, K, H = pool_LPpKH.shape
  B, T = pos_BT.shape
  x_BTKH = x_BTKH.astype(pool_LPpKH.dtype)
  if T == 1:
    pos_B = jnp.maximum(pos_BT[:, 0], 0)
    page_B = jnp.take_along_axis(table_BM, jnp.minimum(pos_B // p, table_BM.shape[1] - 1)[:, None], axis=1)[:, 0]
    page_B = jnp.where(valid_BT[:, 0], page_B, 0)
    slot_B = jnp.where(valid_BT[:, 0], pos_B % p, 0)
    for b in range(B):
      pool_LPpKH = jax.lax.dynamic_update_slice(pool_LPpKH, x_BTKH[b, 0][None, None, None],
                                                (layer, page_B[b], slot_B[b], 0, 0))
    return pool_LPpKH
  # The barrier makes the slice a buffer of its own, so the in-place update below does not copy the
  # whole stacked pool first (as attention.py does for the contiguous cache).
  one = jax.lax.optimization_barrier(pool_LPpKH[layer])
  one = write_pool(one, x_BTKH, table_BM, pos_BT, valid_BT)
  return jax.lax.dynamic_update_index_in_dim(pool_LPpKH, one, layer, 0)


def paged_attention(q_BTNH, k_pages_PpKH, v_pages_PpKH, table_BM, q_pos_BT, kv_len_B, *, sliding_window=None,
                    pages_per_block: int = 1, layer=None) -> jax.Array:
  """Attention of ``q`` ``[B, T, N, H]`` (at positions ``q_pos_BT``; -1 for padding queries) over each
  row's first ``kv_len_B`` cached tokens, read page by page; ``[B, T, N, H]`` in q's dtype.

  With ``layer`` the pools are the stacked ``[L, P, p, K, H]`` ones and each block is gathered straight
  from layer ``layer`` (slicing the layer out first could copy it, a whole layer's pool per step)."""
  B, T, N, H = q_BTNH.shape
  P, p, K, _ = k_pages_PpKH.shape[-4:]
  G, M = N // K, table_BM.shape[1]
  nb = -(-M // pages_per_block)
  if nb * pages_per_block != M:  # whole blocks: pad the table with the null page
    table_BM = jnp.pad(table_BM, ((0, 0), (0, nb * pages_per_block - M)))
  blk = pages_per_block * p
  table_BnJ = table_BM.reshape(B, nb, pages_per_block)
  q_BKGTH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
  q_pos_BT = q_pos_BT.astype(jnp.int32)
  kv_len_B = kv_len_B.astype(jnp.int32)

  hi = -(-jnp.max(kv_len_B) // blk)
  lo = jnp.int32(0)
  if sliding_window is not None:
    real = q_pos_BT >= 0
    q_min = jnp.min(jnp.where(real, q_pos_BT, jnp.iinfo(jnp.int32).max))
    lo = jnp.clip((q_min - sliding_window + 1) // blk, 0, hi)

  def visit(j, carry):
    m, l, acc = carry
    pages_BJ = jax.lax.dynamic_index_in_dim(table_BnJ, j, axis=1, keepdims=False)
    if layer is None:
      k_BSKH = k_pages_PpKH[pages_BJ].reshape(B, blk, K, H)
      v_BSKH = v_pages_PpKH[pages_BJ].reshape(B, blk, K, H)
    else:
      k_BSKH = k_pages_PpKH[layer, pages_BJ].reshape(B, blk, K, H)
      v_BSKH = v_pages_PpKH[layer, pages_BJ].reshape(B, blk, K, H)
    kv_pos_BS = j * blk + jnp.arange(blk, dtype=jnp.int32)[None, :]
    kv_pos_BS = jnp.where(kv_pos_BS < kv_len_B[:, None], kv_pos_BS, -1)  # unfilled slots are padding
    ok_BTS = visible(q_pos_BT[:, :, None], kv_pos_BS[:, None, :], sliding_window=sliding_window)
    # einsum: per kv head k, the G query heads' rows against the block's keys.
    s = jnp.einsum("bkgth,bskh->bkgts", q_BKGTH, k_BSKH, preferred_element_type=_f32) * (H ** -0.5)
    s = jnp.where(ok_BTS[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
    pr = jnp.exp(s - m_safe[..., None])
    a = jnp.exp(m - m_safe)
    l = a * l + pr.sum(-1)
    acc = a[..., None] * acc + jnp.einsum("bkgts,bskh->bkgth", pr.astype(v_BSKH.dtype), v_BSKH,
                                          preferred_element_type=_f32)
    return m_new, l, acc

  stat = (B, K, G, T)
  init = (jnp.full(stat, -jnp.inf, _f32), jnp.zeros(stat, _f32), jnp.zeros(stat + (H,), _f32))
  _, l, acc = jax.lax.fori_loop(lo, hi, visit, init)
  out_BKGTH = acc / jnp.where(l == 0, 1.0, l)[..., None]
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def gather_pages(pages_PpKH, table_BM) -> jax.Array:
  """The contiguous ``[B, M * p, K, H]`` view of each row's pages (tests and debugging; attention never
  builds it)."""
  B, M = table_BM.shape
  _, p, K, H = pages_PpKH.shape
  return pages_PpKH[table_BM].reshape(B, M * p, K, H)
