"""KV-cache decoding equals the full forward pass at every step: plain cache, left-padded batch,
chunked prefill, and a rolling cache run far past the sliding window (prefill longer than the window
too), each also with the one-token steps on generate's CPU decode path (unrolled layers over zero-copy
per-layer views, the cache written by layer in place). The reference is the cache-free forward of each sequence on its own (no padding, positions 0..T-1),
computed without a cache or mask, so it shares no masking, slot or scatter code with the cache path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.kv_cache import write_slots as _write_slots
from mixtral_jax.model import layer_views
from reference import sharp_model

RTOL = 1e-5


@functools.lru_cache
def _model(**overrides):
  return sharp_model(3, **overrides)


@functools.partial(jax.jit, static_argnums=0)
def _cached_step(graphdef, state, ids_BT, positions_BT, mask_BT, cache, layers=None):
  model = nnx.merge(graphdef, state)
  h, aux = model.hidden(ids_BT, attention_mask=mask_BT, positions=positions_BT, cache=cache, layers=layers)
  return model.logits(h), aux["cache"]


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, ids_BT):
  return nnx.merge(graphdef, state)(ids_BT)


def _assert_close(got, want, what):
  err = np.max(np.abs(np.asarray(got) - want))
  scale = np.max(np.abs(want))
  assert err <= RTOL * scale, f"{what}: max abs error {err:.3g} > {RTOL} x {scale:.3g}"


def _run(model, seqs, chunks, cache_len, views=False):
  """Feeds ``seqs`` (token lists, left-padded to the first chunk) through the cache in ``chunks``
  (column counts; the first chunk is the left-padded prompt, later chunks are real tokens for every
  row) and checks every real token's logits against each sequence's own full forward pass. With
  ``views``, one-token chunks run the unrolled layers over ``layer_views`` (generate's CPU decode)."""
  graphdef, state = nnx.split(model)
  B, prompt = len(seqs), chunks[0]
  total = [len(s) for s in seqs]
  pads = [prompt - (n - sum(chunks[1:])) for n in total]
  ids = np.zeros((B, prompt + sum(chunks[1:])), np.int32)
  mask = np.zeros_like(ids)
  for b, s in enumerate(seqs):
    ids[b, pads[b]:] = s
    mask[b, pads[b]:] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  # Right-padded to one length, positions 0..T-1, no mask: causal attention keeps the pads behind
  # every real token, so each row's real logits are those of the sequence alone.
  right = np.zeros((B, max(total)), np.int32)
  for b, s in enumerate(seqs):
    right[b, :len(s)] = s
  full = np.asarray(_full_logits(graphdef, state, jnp.asarray(right)))

  cache = mj.init_cache(model.cfg, B, cache_len)
  start = 0
  for c in chunks:
    sl = slice(start, start + c)
    layers = layer_views(model) if views and c == 1 else None
    logits, cache = _cached_step(graphdef, state, jnp.asarray(ids[:, sl]), jnp.asarray(positions[:, sl]),
                                 jnp.asarray(mask[:, sl]), cache, layers)
    for b in range(B):
      real = mask[b, sl].astype(bool)
      _assert_close(np.asarray(logits)[b][real], full[b][positions[b, sl][real]], f"row {b}, columns {sl}")
    start += c
  return cache


@pytest.mark.slow
@pytest.mark.parametrize("views", [False, True])
def test_decode_and_chunked_prefill_match_full_forward_left_padded_batch(views):
  model = _model()
  rs = np.random.RandomState(0)
  seqs = [rs.randint(0, 1000, n + 16).tolist() for n in (9, 4, 1)]
  cache = _run(model, seqs, chunks=[9, 4, 4] + [1] * 8, cache_len=32, views=views)
  # Slots hold positions 0..len-1 in order; the rest stay empty.
  pos = np.asarray(cache.pos)
  for b, s in enumerate(seqs):
    np.testing.assert_array_equal(pos[b, :len(s)], np.arange(len(s)))
    assert (pos[b, len(s):] == -1).all()


@pytest.mark.slow
@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize("prompt", [5, 12])  # prompt shorter / longer than the window of 7
def test_rolling_cache_past_sliding_window(prompt, views):
  """Runs 3x past the window; the 6-token chunk overwrites slots that its own queries still read."""
  model = _model(sliding_window=7)
  rs = np.random.RandomState(prompt)
  seqs = [rs.randint(0, 1000, prompt + 6 + 15).tolist(), rs.randint(0, 1000, prompt - 2 + 6 + 15).tolist()]
  cache = _run(model, seqs, chunks=[prompt, 6] + [1] * 15, cache_len=64, views=views)
  assert cache.size == 7, "with a sliding window the cache should hold only the window"
  # Each row's 7 slots hold its last 7 positions, position p in slot p % 7.
  pos = np.asarray(cache.pos)
  for b, s in enumerate(seqs):
    last = np.arange(len(s) - 7, len(s))
    np.testing.assert_array_equal(pos[b, last % 7], last)


def test_write_slots_drops_pads_and_overwritten_tokens():
  positions = jnp.array([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
  valid = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]], bool)
  slots = np.asarray(_write_slots(positions, valid, 4))
  # Pads -> 4 (dropped); positions 0..3 are overwritten by 4..7 in this call -> dropped.
  np.testing.assert_array_equal(slots, [[4, 4, 4, 4, 4, 4, 0, 1, 2, 3]])
