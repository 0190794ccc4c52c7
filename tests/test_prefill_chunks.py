"""Chunked prefill and the in-place KV cache.

- ``generate``'s prefill in chunks of C columns writes the same cache (every slot's keys, values and
  position) and samples the same first token as the whole prompt in one call, with and without a
  sliding window shorter than the prompt (a rolling cache, where a chunk overwrites slots its own
  early queries still read); and generate's tokens are the same.
- The compiled decode step and prefill chunk of the scanned layer stack hold no second copy of the
  KV cache: XLA's own memory analysis reports fewer temporary bytes than the cache has.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.generate import generate
from mixtral_jax.inference.programs import lower_decode, lower_prefill, prefill_program
from mixtral_jax.sampling import RowSettings
from reference import sharp_model


@functools.lru_cache
def _model(**overrides):
  return sharp_model(5, **overrides)


def _prefill_in_chunks(model, prompts, C, cache_len):
  P = 1 << (max(map(len, prompts)) - 1).bit_length()
  ids = np.zeros((len(prompts), P), np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, P - len(p):], mask[i, P - len(p):] = p, 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  graphdef, state = nnx.split(model)
  B = len(prompts)
  cache = mj.init_cache(model.cfg, B, cache_len)
  greedy = RowSettings.of([(0.0, 0, 1.0, 0, b) for b in range(B)])
  prefill = prefill_program(graphdef)  # generate's (the engine's) batch prefill, left-padded rows here
  for c in range(0, P, C):
    token, cache = prefill(state, ids[:, c:c + C], positions[:, c:c + C], mask[:, c:c + C].astype(bool), cache,
                           None, np.zeros(B, bool), np.full(B, C - 1, np.int32), greedy)
  return np.asarray(token), cache


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 7])
def test_chunked_prefill_equals_one_piece(window):
  model = _model(sliding_window=window)
  rs = np.random.RandomState(0)
  prompts = [rs.randint(3, 1000, n).tolist() for n in (37, 20, 5)]  # left-padded to P = 64
  want_token, want = _prefill_in_chunks(model, prompts, 64, 80)
  got_token, got = _prefill_in_chunks(model, prompts, 16, 80)
  np.testing.assert_array_equal(got_token, want_token)
  pos = np.asarray(want.pos)
  np.testing.assert_array_equal(np.asarray(got.pos), pos)
  filled = pos >= 0  # [B, S]; empty slots hold whatever was there
  assert filled.sum() == sum(min(len(p), window or 80) for p in prompts)
  for name in ("k", "v"):
    w = np.asarray(getattr(want.layers, name))[:, filled]
    g = np.asarray(getattr(got.layers, name))[:, filled]
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
  if window is None:
    return
  # And generate itself: the prefill in 16-column chunks changes no token.
  one = generate(model, prompts, 6, eos_id=None)
  chunked = generate(model, prompts, 6, eos_id=None, prefill_chunk=16)
  assert chunked.tokens == one.tokens
  assert [t[0] for t in one.tokens] == got_token[:3].tolist()


def test_prefill_chunk_must_be_a_power_of_two():
  with pytest.raises(ValueError, match="prefill_chunk must be a power of two"):
    generate(_model(), [[1, 2, 3]], 2, prefill_chunk=24)


@pytest.mark.slow
def test_compiled_steps_hold_no_second_cache():
  """Scanned stack (no layer views), cache much larger than every activation: decode's and a
  prefill chunk's temporaries stay below one cache (a copy as scan output would be one whole cache)."""
  model = _model(num_hidden_layers=8)
  graphdef, state = nnx.split(model)
  B, S, C = 2, 2048, 16
  cache = jax.eval_shape(lambda: mj.init_cache(model.cfg, B, S))
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  decode = lower_decode(graphdef, state, cache).compile()
  prefill = lower_prefill(graphdef, state, cache, C).compile()
  for name, compiled in (("decode", decode), ("prefill chunk", prefill)):
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < cache_bytes / 2, f"{name}: {temp} bytes of temporaries for a {cache_bytes}-byte cache"
