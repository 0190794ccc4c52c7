"""The model over a paged KV cache equals its full forward pass: prompts with a shared prefix (reused
from the prefix cache), chunked prefill, compacted decode batches of changing membership, and a
preempted sequence recomputed. The reference is each sequence's cache-free forward on its own
(``model(ids)``), which shares no cache, page or masking code with the paged path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.attn.paged import PagedKVCache, init_pools
from mixtral_jax.inference.paged_batch import compiled_sizes, decode_arrays, prefill_arrays
from mixtral_jax.inference.paged_programs import paged_step_program
from mixtral_jax.inference.pages import PagePool
from reference import FP32, sharp_model

RTOL = 1e-5


@functools.lru_cache
def _model():
  return sharp_model(3, **FP32)


def _full(seqs):
  """Each token list's full-forward logits [T_i, V], in one call (right padding cannot change the
  earlier positions of a causal model)."""
  T = max(len(s) for s in seqs)
  ids = np.zeros((len(seqs), T), np.int32)
  for b, s in enumerate(seqs):
    ids[b, :len(s)] = s
  out = np.asarray(_model()(jnp.asarray(ids)))
  return [out[b, :len(s)] for b, s in enumerate(seqs)]


def _close(got, want, what):
  err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
  assert err <= RTOL * scale, f"{what}: max abs error {err:.3g} > {RTOL} x {scale:.3g}"


@pytest.mark.slow
def test_paged_prefill_and_decode_equal_the_full_forward():
  model = _model()
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  run = paged_step_program(graphdef)
  page_size, width, chunk = 8, 8, 16
  pool = PagePool(20, page_size)
  k, v = init_pools(cfg.num_hidden_layers, pool.num_pages, page_size, cfg.num_key_value_heads, cfg.head_size,
                    jnp.float32)
  rng = np.random.default_rng(0)
  shared = [int(t) for t in rng.integers(1, cfg.vocab_size, 19)]
  prompts = [shared + [int(t) for t in rng.integers(1, cfg.vocab_size, n)] for n in (5, 2, 9)]

  def step(arrays):
    nonlocal k, v
    cache = PagedKVCache(k, v, jnp.asarray(arrays.table_RM), jnp.asarray(arrays.kv_len_R))
    logits, cache = run(state, arrays.ids_RC, arrays.positions_RC, arrays.valid_RC, cache, arrays.last_R)
    k, v = cache.k, cache.v
    return np.asarray(logits)

  running, seen = [], {}  # (sequence id, position) -> the logits the paged step gave there
  for i, prompt in enumerate(prompts):
    seq = pool.admit(i, prompt)
    while seq.computed < len(seq.tokens):
      a = prefill_arrays(pool, seq, chunk, width)
      logits = step(a)
      pool.mark_computed(seq, int(a.kv_len_R[0]))
    seen[(seq.id, len(seq.tokens) - 1)] = logits[0]
    pool.append(seq, int(np.argmax(logits[0])))
    running.append(seq)
  assert [s.cached_tokens for s in running] == [0, 16, 16]

  sizes = compiled_sizes(4)
  for t in range(12):
    live = [s for j, s in enumerate(running) if (t + j) % 4 != 1]  # membership changes every step
    assert pool.ensure_room(live) == []
    a = decode_arrays(pool, live, width, sizes)
    logits = step(a)
    for r, seq in enumerate(live):
      seen[(seq.id, len(seq.tokens) - 1)] = logits[r]
      pool.mark_computed(seq, len(seq.tokens))
      pool.append(seq, int(np.argmax(logits[r])))

  # Preempt the newest, then admit its tokens again: recomputed (mostly from its cached pages).
  victim = running.pop()
  pool.release(victim)
  again = pool.admit(9, list(victim.tokens))
  assert again.cached_tokens >= len(victim.tokens) - page_size - 1
  while again.computed < len(again.tokens):
    a = prefill_arrays(pool, again, chunk, width)
    logits = step(a)
    pool.mark_computed(again, int(a.kv_len_R[0]))
  seqs = running + [victim]
  for seq, want in zip(seqs, _full([s.tokens for s in seqs])):
    positions = [p for (i, p) in seen if i == seq.id]
    assert len(positions) >= 10
    for p in positions:
      _close(seen[(seq.id, p)], want[p], f"sequence {seq.id} position {p}")
  _close(logits[0], _full([again.tokens])[0][-1], "recomputed after preemption")
