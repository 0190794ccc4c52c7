"""Paged attention (mixtral_jax.attn.paged) equals dense attention over the same keys and values laid
out contiguously, and a float64 NumPy recomputation.

Each row's contiguous cache is written into scattered pages (a random permutation of the pool) with
``write_pages``, in prefill chunks and single decode tokens; the pages read back through the table
equal the contiguous cache; attention through the table equals ``attn.dense.dense_attention`` over the
contiguous cache (GQA, rows of different lengths, sliding window, several pages per block, prefill
chunks starting mid-row as after a prefix-cache hit, padding queries).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.attn.dense import dense_attention
from mixtral_jax.attn.paged import gather_pages, paged_attention, write_layer, write_pages

K, G, H = 2, 3, 8
N = K * G


def _setup(rng, lens, page_size, num_pages, width):
  """Random contiguous caches [B, S, K, H] for rows of ``lens`` tokens, and page tables drawn from a
  shuffled pool (page 0 kept as the null page)."""
  B = len(lens)
  S = width * page_size
  k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  v = rng.standard_normal((B, S, K, H)).astype(np.float32)
  order = rng.permutation(np.arange(1, num_pages))
  table = np.zeros((B, width), np.int32)
  used = 0
  for b, n in enumerate(lens):
    m = -(-n // page_size)
    table[b, :m] = order[used:used + m]
    used += m
  return k, v, table


def _write_all(k, v, table, lens, page_size, num_pages, chunk):
  """Writes each row's first ``lens[b]`` tokens into fresh pools, ``chunk`` positions per call."""
  B = len(lens)
  kp = jnp.zeros((num_pages, page_size, K, H), jnp.float32)
  vp = jnp.zeros_like(kp)
  write = jax.jit(write_pages)
  for start in range(0, max(lens), chunk):
    pos = np.arange(start, start + chunk)[None, :].repeat(B, 0)
    valid = pos < np.array(lens)[:, None]
    idx = np.minimum(pos, k.shape[1] - 1)
    kc = np.take_along_axis(k, idx[:, :, None, None], 1)
    vc = np.take_along_axis(v, idx[:, :, None, None], 1)
    kp, vp = write(kp, vp, kc, vc, table, pos.astype(np.int32), valid)
  return kp, vp


def _numpy_attention(q, k, v, q_pos, kv_len, window):
  """float64 reference: plain softmax over each query's visible keys (0 where none is visible)."""
  B, T = q.shape[:2]
  out = np.zeros(q.shape, np.float64)
  for b in range(B):
    for t in range(T):
      qp = q_pos[b, t]
      s_pos = np.arange(kv_len[b])
      ok = (s_pos <= qp) & (qp >= 0)
      if window is not None:
        ok &= qp - s_pos < window
      if not ok.any():
        continue
      for n in range(N):
        kk = k[b, :kv_len[b], n // G].astype(np.float64)[ok]
        vv = v[b, :kv_len[b], n // G].astype(np.float64)[ok]
        s = kk @ q[b, t, n].astype(np.float64) / np.sqrt(H)
        w = np.exp(s - s.max())
        out[b, t, n] = (w / w.sum()) @ vv
  return out


@functools.partial(jax.jit, static_argnames=("sliding_window", "pages_per_block"))
def _paged(q, kp, vp, table, q_pos, kv_len, sliding_window=None, pages_per_block=1):
  return paged_attention(q, kp, vp, table, q_pos, kv_len, sliding_window=sliding_window,
                         pages_per_block=pages_per_block)


def test_write_then_gather_is_the_contiguous_cache_and_padding_is_dropped():
  rng = np.random.default_rng(0)
  lens, page_size, num_pages, width = [13, 5, 0], 4, 16, 4
  k, v, table = _setup(rng, lens, page_size, num_pages, width)
  kp, vp = _write_all(k, v, table, lens, page_size, num_pages, chunk=3)
  got_k, got_v = np.asarray(gather_pages(kp, table)), np.asarray(gather_pages(vp, table))
  for b, n in enumerate(lens):
    np.testing.assert_array_equal(got_k[b, :n], k[b, :n])
    np.testing.assert_array_equal(got_v[b, :n], v[b, :n])
  assert not np.asarray(kp[0]).any(), "padding tokens wrote into the null page"
  owned = set(table[table > 0].tolist())
  for page in set(range(num_pages)) - owned:
    assert not np.asarray(kp[page]).any() and not np.asarray(vp[page]).any()


@pytest.mark.parametrize("page_size,pages_per_block,window", [(4, 1, None), (4, 3, None), (8, 2, 6), (3, 1, 5)])
@pytest.mark.slow
def test_prefill_chunk_and_decode_equal_dense_and_numpy(page_size, pages_per_block, window):
  rng = np.random.default_rng(page_size * 10 + pages_per_block)
  lens, num_pages = [23, 9, 1, 17], 40
  width = -(-max(lens) // page_size) + 1
  k, v, table = _setup(rng, lens, page_size, num_pages, width)
  kp, vp = _write_all(k, v, table, lens, page_size, num_pages, chunk=5)
  kv_len = np.array(lens, np.int32)
  S = width * page_size
  kv_pos = np.where(np.arange(S)[None, :] < kv_len[:, None], np.arange(S)[None, :], -1).astype(np.int32)

  # A prefill chunk: the last T=6 tokens of each row (a row shorter than that pads with -1 in front),
  # as after a prefix-cache hit on the rest; then a decode step (T=1) at each row's last position.
  for T in (6, 1):
    q = rng.standard_normal((len(lens), T, N, H)).astype(np.float32)
    q_pos = (kv_len[:, None] - T + np.arange(T)[None, :]).astype(np.int32)
    q_pos = np.where(q_pos >= 0, q_pos, -1)
    got = np.asarray(_paged(q, kp, vp, table, q_pos, kv_len, sliding_window=window,
                            pages_per_block=pages_per_block))
    want = np.asarray(dense_attention(q, k, v, q_pos, kv_pos, sliding_window=window))
    want64 = _numpy_attention(q, k, v, q_pos, kv_len, window)
    real = q_pos >= 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want64, rtol=1e-5, atol=1e-5)  # padding queries: 0 in both
    assert not got[~real].any()


def test_compact_batch_padding_rows_read_nothing():
  """Rows past the live ones (compiled batch padding): null table, kv_len 0, q_pos -1 -> zeros, and a
  live row's output does not depend on them."""
  rng = np.random.default_rng(3)
  page_size, num_pages, width = 4, 12, 3
  k, v, table = _setup(rng, [10], page_size, num_pages, width)
  kp, vp = _write_all(k, v, table, [10], page_size, num_pages, chunk=4)
  q = rng.standard_normal((1, 1, N, H)).astype(np.float32)
  alone = np.asarray(_paged(q, kp, vp, table, np.array([[9]], np.int32), np.array([10], np.int32)))
  q4 = np.concatenate([q, rng.standard_normal((3, 1, N, H)).astype(np.float32)])
  table4 = np.concatenate([table, np.zeros((3, width), np.int32)])
  q_pos4 = np.array([[9], [-1], [-1], [-1]], np.int32)
  got = np.asarray(_paged(q4, kp, vp, table4, q_pos4, np.array([10, 0, 0, 0], np.int32)))
  np.testing.assert_array_equal(got[:1], alone)
  assert not got[1:].any()


def test_bf16_pages_follow_dense_in_bf16():
  """Stored in bfloat16 (the serving dtype), the paged read equals dense attention on the same bf16
  keys/values to bf16 rounding."""
  rng = np.random.default_rng(4)
  lens, page_size, num_pages, width = [30, 12], 8, 12, 4
  k, v, table = _setup(rng, lens, page_size, num_pages, width)
  kp, vp = _write_all(k, v, table, lens, page_size, num_pages, chunk=8)
  kp, vp = kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((2, 1, N, H)), jnp.bfloat16)
  kv_len = np.array(lens, np.int32)
  q_pos = (kv_len - 1)[:, None]
  got = np.asarray(_paged(q, kp, vp, table, q_pos, kv_len), np.float32)
  S = width * page_size
  kv_pos = np.where(np.arange(S)[None, :] < kv_len[:, None], np.arange(S)[None, :], -1).astype(np.int32)
  want = np.asarray(dense_attention(q, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), q_pos, kv_pos),
                    np.float32)
  np.testing.assert_allclose(got, want, atol=2e-2)


def test_no_score_matrix_over_the_whole_cache():
  """The compiled read holds at most one block of scores: no [T, S] array for a long cache."""
  T, page_size, width, num_pages = 16, 16, 256, 300  # S = 4096 keys per row
  q = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
  kp = jax.ShapeDtypeStruct((num_pages, page_size, K, H), jnp.float32)
  table = jax.ShapeDtypeStruct((1, width), jnp.int32)
  pos = jax.ShapeDtypeStruct((1, T), jnp.int32)
  ln = jax.ShapeDtypeStruct((1,), jnp.int32)
  hlo = jax.jit(paged_attention).lower(q, kp, kp, table, pos, ln).as_text()
  assert "x4096x" not in hlo and "16x4096" not in hlo
  assert "tensor<1x2x3x16x16xf32>" in hlo  # one block of scores: [B, K, G, T, block]


@pytest.mark.parametrize("T", [1, 5])
def test_write_layer_into_the_stacked_pool_equals_write_pages(T):
  """Layer 1 of a stacked [L, P, p, K, H] pool written by write_layer (decode: one update per row;
  chunks: the layer's scatter) holds what write_pages writes into a single pool; other layers are
  untouched; a padding row (decode) writes only into the null page."""
  rng = np.random.default_rng(5)
  L, P, p, B, width = 3, 10, 4, 3, 3
  pool = rng.standard_normal((L, P, p, K, H)).astype(np.float32)
  table = np.array([[3, 5, 9], [7, 1, 2], [0, 0, 0]], np.int32)
  pos = np.array([[6 + t for t in range(T)], [1 + t for t in range(T)], [0] * T], np.int32)
  valid = np.ones((B, T), bool)
  valid[2] = False
  x = rng.standard_normal((B, T, K, H)).astype(np.float32)
  got = np.asarray(jax.jit(write_layer)(pool, 1, x, table, pos, valid))
  from mixtral_jax.attn.paged import write_pool
  want = np.asarray(write_pool(jnp.asarray(pool[1]), x, table, pos, valid))
  np.testing.assert_array_equal(got[1, 1:], want[1:])  # every page but the null page
  np.testing.assert_array_equal(got[0], pool[0])
  np.testing.assert_array_equal(got[2], pool[2])
  if T == 5:
    np.testing.assert_array_equal(got[1, 0], pool[1, 0])  # chunks drop padding entirely


def test_stacked_pool_read_by_layer_equals_the_layer_alone():
  rng = np.random.default_rng(6)
  L, P, p = 3, 9, 4
  kp = rng.standard_normal((L, P, p, K, H)).astype(np.float32)
  vp = rng.standard_normal((L, P, p, K, H)).astype(np.float32)
  table = np.array([[2, 5, 7], [4, 0, 0]], np.int32)
  q = rng.standard_normal((2, 3, N, H)).astype(np.float32)
  q_pos = np.array([[8, 9, 10], [1, 2, 3]], np.int32)
  kv_len = np.array([11, 4], np.int32)
  stacked = jax.jit(functools.partial(paged_attention, pages_per_block=2))(q, kp, vp, table, q_pos, kv_len, layer=1)
  alone = _paged(q, kp[1], vp[1], table, q_pos, kv_len, pages_per_block=2)
  np.testing.assert_array_equal(np.asarray(stacked), np.asarray(alone))


def test_paged_layer_writes_then_attends_and_keeps_other_layers():
  """paged_layer on layer 1 of a 2-layer cache: the output equals dense attention over the row's whole
  token list (cached part + this chunk), layer 0 is untouched, the table and lengths pass through."""
  from mixtral_jax.attn.paged import PagedKVCache, init_pools, paged_layer
  rng = np.random.default_rng(7)
  p, P = 4, 12
  T = 3
  k_all = rng.standard_normal((2, 9, K, H)).astype(np.float32)
  v_all = rng.standard_normal((2, 9, K, H)).astype(np.float32)
  table = np.array([[3, 8, 0], [5, 0, 0]], np.int32)
  kp, vp = init_pools(2, P, p, K, H, jnp.float32)
  pos0 = np.array([[0, 1, 2, 3, 4, 5], [0] * 6], np.int32)
  k1, v1 = write_pages(kp[1], vp[1], k_all[:, :6], v_all[:, :6], table, pos0, np.array([[True] * 6, [False] * 6]))
  kp, vp = kp.at[1].set(k1), vp.at[1].set(v1)  # row 0's first 6 tokens are cached
  pos = np.array([[6, 7, 8], [0, 1, 2]], np.int32)
  valid = np.array([[True] * 3, [True, True, False]])
  kv_len = np.array([9, 2], np.int32)
  q = rng.standard_normal((2, T, N, H)).astype(np.float32)
  cache = PagedKVCache(kp, vp, jnp.asarray(table), jnp.asarray(kv_len))
  k_new = np.stack([k_all[0, 6:9], k_all[1, 0:3]])
  v_new = np.stack([v_all[0, 6:9], v_all[1, 0:3]])
  out, new = jax.jit(paged_layer, static_argnames=("sliding_window", "pages_per_block"))(
      cache, 1, q, k_new, v_new, pos, valid)
  kv_pos = np.array([list(range(9)), [0, 1] + [-1] * 7], np.int32)
  want = np.asarray(dense_attention(q, k_all, v_all, np.where(valid, pos, 0), kv_pos))
  np.testing.assert_allclose(np.asarray(out)[valid], want[valid], rtol=1e-5, atol=1e-5)
  assert not np.asarray(out)[~valid].any()
  np.testing.assert_array_equal(np.asarray(new.k[0]), 0)
  np.testing.assert_array_equal(np.asarray(new.table), table)
