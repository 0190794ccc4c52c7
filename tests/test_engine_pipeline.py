"""The fixed-row engine's decode pipeline: decode chunk c+1 is dispatched before chunk c is read back,
and every request's tokens still equal a recomputation without any cache (the full causal forward over
the prompt and the tokens so far, argmax at the last position), with rows that stop early at EOS or at
their own max_tokens while the others decode on."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.inference.engine import Engine, Request
from reference import FP32, sharp_model

WIDTH = 64  # the reference forward's padded length (right padding: causal, so it changes nothing)


@functools.lru_cache
def _model():
  return sharp_model(3, **FP32)


@functools.lru_cache
def _forward():
  graphdef, state = nnx.split(_model())
  return functools.partial(jax.jit(lambda state, ids_1T: nnx.merge(graphdef, state)(ids_1T)), state)


def _reference(prompt, new_tokens):
  """Greedy continuation by full forwards, one per token (no KV cache, no engine)."""
  ids, out = list(prompt), []
  for _ in range(new_tokens):
    padded = np.zeros((1, WIDTH), np.int32)
    padded[0, :len(ids)] = ids
    token = int(np.argmax(np.asarray(_forward()(padded))[0, len(ids) - 1]))
    ids.append(token)
    out.append(token)
  return out


class _Recorded:
  """A device result whose read-back (``np.asarray``) is logged."""

  def __init__(self, array, events):
    self.array, self.events = array, events

  def __array__(self, dtype=None, copy=None):
    self.events.append("read")
    return np.asarray(self.array, dtype)


@pytest.mark.slow
def test_chunks_overlap_and_tokens_equal_a_cacheless_recomputation():
  rng = np.random.default_rng(4)
  prompts = [[int(t) for t in rng.integers(3, 1000, n)] for n in (9, 3, 14)]
  limits = [18, 7, 22]
  refs = [_reference(p, n) for p, n in zip(prompts, limits)]
  eos = refs[2][11]  # row 2 stops there (and any row whose reference produces it earlier)
  expected = [r[:r.index(eos)] if eos in r else r for r in refs]

  engine = Engine(_model(), max_batch=4, max_context=WIDTH, prefill_chunk=16)
  events, decode = [], engine._decode  # noqa: SLF001 - the engine's own decode program, wrapped

  def logged(*args):
    out_CB, last_B, cache = decode(*args)
    events.append("dispatch")
    return _Recorded(out_CB, events), last_B, cache

  engine._decode = logged  # noqa: SLF001
  requests = [Request(p, n, lambda *_: None, lambda *_: None, eos=frozenset([eos])) for p, n in zip(prompts, limits)]
  for req in requests:
    engine.submit(req)
  engine.run_until_done()

  assert [req.row.tokens for req in requests] == expected
  assert [req.row.finish for req in requests] == ["eos" if eos in r else "length" for r in refs]
  pairs = list(zip(events, events[1:]))
  assert ("dispatch", "dispatch") in pairs, f"no chunk was dispatched before the last one was read: {events}"
  assert events.count("read") <= events.count("dispatch")


@pytest.mark.slow
def test_requests_joining_a_decoding_batch_equal_a_cacheless_recomputation():
  """Three requests join while one decodes: their prompts run as one prefill of 4 rows cut out of the
  8-row cache (the fourth a decoding row, which must come back unchanged), then all decode together."""
  rng = np.random.default_rng(5)
  prompts = [[int(t) for t in rng.integers(3, 1000, n)] for n in (12, 5, 16, 2)]
  limits = [20, 9, 6, 11]
  engine = Engine(_model(), max_batch=8, max_context=WIDTH, prefill_chunk=16)
  requests = [Request(p, n, lambda *_: None, lambda *_: None) for p, n in zip(prompts, limits)]
  engine.submit(requests[0])
  for _ in range(3):  # its prefill, then decode chunks
    engine.step()
  assert 0 < len(requests[0].row.tokens) < limits[0]
  for req in requests[1:]:
    engine.submit(req)
  engine.run_until_done()
  assert [req.row.tokens for req in requests] == [_reference(p, n) for p, n in zip(prompts, limits)]
