"""Paged steps end to end without the model: the page pool, prefix cache, chunked prefill, compacted
decode batches and paged attention together give each sequence the attention output that dense
attention over its whole token list gives (a one-layer toy whose keys/values depend on the token only).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.attn.dense import dense_attention
from mixtral_jax.attn.paged import paged_attention, write_pages
from mixtral_jax.inference.pages import PagePool
from mixtral_jax.inference.paged_batch import compiled_sizes, decode_arrays, padded_size, prefill_arrays

V, K, G, H = 50, 2, 2, 8
N = K * G
RNG = np.random.default_rng(0)
EQ, EK, EV = (RNG.standard_normal((V, n, H)).astype(np.float32) for n in (N, K, K))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _step(kp, vp, ids, pos, valid, table, kv_len):
  kp, vp = write_pages(kp, vp, jnp.asarray(EK)[ids], jnp.asarray(EV)[ids], table, pos, valid)
  return kp, vp, paged_attention(jnp.asarray(EQ)[ids], kp, vp, table, pos, kv_len, pages_per_block=2)


def _reference(tokens):
  t = np.asarray(tokens)[None]
  pos = np.arange(len(tokens), dtype=np.int32)[None]
  return np.asarray(dense_attention(EQ[t], EK[t], EV[t], pos, pos))[0]


def test_compiled_sizes():
  assert compiled_sizes(16) == (1, 2, 4, 8, 16) and compiled_sizes(6) == (1, 2, 4, 6) and compiled_sizes(1) == (1,)
  assert padded_size(3, compiled_sizes(16)) == 4 and padded_size(1, (1, 2)) == 1
  with pytest.raises(ValueError, match="exceed the largest compiled batch 2"):
    padded_size(3, (1, 2))


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.slow
def test_paged_steps_equal_dense_attention(prefix_caching):
  page_size, width, chunk = 4, 8, 8
  pool = PagePool(24, page_size, prefix_caching=prefix_caching)
  kp = jnp.zeros((pool.num_pages, page_size, K, H), jnp.float32)
  vp = jnp.zeros_like(kp)
  rng = np.random.default_rng(1)
  shared = list(rng.integers(1, V, 10))
  prompts = [shared + list(rng.integers(1, V, n)) for n in (3, 7, 1)] + [list(rng.integers(1, V, 5))]
  outputs = {}  # (sequence id, position) -> [N, H]
  sizes = compiled_sizes(4)

  def record(arrays, out):
    for r, seq in enumerate(arrays.seqs):
      for c in range(arrays.ids_RC.shape[1]):
        if arrays.valid_RC[r, c]:
          outputs[(seq.id, int(arrays.positions_RC[r, c]))] = np.asarray(out[r, c])

  running = []
  for i, prompt in enumerate(prompts):
    seq = pool.admit(i, prompt)
    while seq.computed < len(seq.tokens):  # this request's whole prompt, chunk by chunk
      a = prefill_arrays(pool, seq, chunk, width)
      kp, vp, out = _step(kp, vp, a.ids_RC, a.positions_RC, a.valid_RC, a.table_RM, a.kv_len_R)
      record(a, out)
      pool.mark_computed(seq, int(a.kv_len_R[0]))
    running.append(seq)
  if prefix_caching:  # requests 1 and 2 reused the shared system prompt's first two pages
    assert [s.cached_tokens for s in running] == [0, 8, 8, 0]
  for step in range(7):  # decode, a different subset of rows each step: compacted and padded
    live = [s for j, s in enumerate(running) if (step + j) % 3 != 0]
    for s in live:
      pool.append(s, int(rng.integers(1, V)))
    assert pool.ensure_room(live) == []
    a = decode_arrays(pool, live, width, sizes)
    assert a.ids_RC.shape[0] == padded_size(len(live), sizes) and not a.valid_RC[len(live):].any()
    kp, vp, out = _step(kp, vp, a.ids_RC, a.positions_RC, a.valid_RC, a.table_RM, a.kv_len_R)
    record(a, out)
    for s in live:
      pool.mark_computed(s, len(s.tokens))
    assert not np.asarray(out)[len(live):].any()
  for seq in running:
    want = _reference(seq.tokens)
    for p in range(seq.cached_tokens, len(seq.tokens)):  # every position computed once, none skipped
      np.testing.assert_allclose(outputs[(seq.id, p)], want[p], rtol=1e-5, atol=1e-5, err_msg=f"{seq.id} {p}")
    assert not any((seq.id, p) in outputs for p in range(seq.cached_tokens))


def test_arrays_refuse_missing_room_and_empty_chunks():
  pool = PagePool(8, 4)
  seq = pool.admit(0, [1, 2, 3, 4])
  pool.mark_computed(seq, 4)
  with pytest.raises(ValueError, match="no tokens left to prefill"):
    prefill_arrays(pool, seq, 8, 4)
  pool.append(seq, 5)
  with pytest.raises(ValueError, match="call PagePool.ensure_room first"):
    decode_arrays(pool, [seq], 4, (1,))
