"""Greedy generation through the PagedRunner (paged cache, prefix reuse, compacted decode, preemption
under a tight pool) gives each request the tokens ``mixtral_jax.generate`` gives it alone."""

import functools

import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.model import layer_views
from mixtral_jax.inference.paged_runner import PagedRunner
from mixtral_jax.sampling import RowSettings
from reference import TINY


@functools.lru_cache
def _model():
  cfg = mj.MixtralConfig(**{**TINY, "param_dtype": "float32", "dtype": "float32"})
  model = mj.Mixtral(cfg, rngs=nnx.Rngs(4))
  model.blocks.moe.router_DE[...] = model.blocks.moe.router_DE[...] * 20
  return model


def _prompts():
  rng = np.random.default_rng(0)
  shared = [int(t) for t in rng.integers(1, 1000, 21)]
  return [shared + [int(t) for t in rng.integers(1, 1000, n)] for n in (4, 1, 11)] + [[5, 6, 7]]


@functools.lru_cache
def _alone(new_tokens):
  out = mj.generate(_model(), _prompts(), new_tokens, eos_id=None)
  return [list(map(int, t)) for t in out.tokens]


def _serve(num_pages, new_tokens, max_batch=4, views=False, steps=1):
  """A minimal greedy loop over the runner: admit in order, prefill, decode what is admitted (with
  ``steps`` > 1: up to that many decode steps per device call, sampling on device)."""
  model = _model()
  graphdef, state = nnx.split(model)
  runner = PagedRunner(graphdef, state, model.cfg, num_pages=num_pages, page_size=8, max_batch=max_batch,
                       max_context=64, prefill_chunk=16, layers=layer_views(model) if views else None)
  waiting = [(i, list(p)) for i, p in enumerate(_prompts())]
  lengths = {i: len(p) for i, p in waiting}
  running, out, preempted = [], {}, 0
  while waiting or running:
    while waiting and len(running) < max_batch:
      seq = runner.admit(*waiting[0])
      if seq is None:
        break
      waiting.pop(0)
      logits = None
      while logits is None:
        logits = runner.prefill(seq)
      runner.append(seq, int(np.argmax(logits)))
      running.append(seq)
    for seq in [s for s in running if len(s.tokens) - lengths[s.id] >= new_tokens]:
      running.remove(seq)
      out[seq.id] = seq.tokens[lengths[seq.id]:]
      runner.release(seq)
    for victim in runner.ensure_room(running):
      running.remove(victim)
      waiting.insert(0, (victim.id, victim.tokens))
      preempted += 1
    n = min([steps, runner.room(running)] + [new_tokens - len(s.tokens) + lengths[s.id] for s in running])
    if running and n > 1:
      runner.decode_steps(running, lambda R: RowSettings.of([(0.0, 0, 1.0, 0, 0)] * R), [0] * len(running), n)
    elif running:
      logits = runner.decode(running)
      for seq, row in zip(running, logits):
        runner.append(seq, int(np.argmax(row)))
  return [out[i] for i in range(len(lengths))], runner, preempted


@pytest.mark.slow
def test_paged_greedy_equals_generate_alone():
  got, runner, preempted = _serve(num_pages=40, new_tokens=10)
  assert got == _alone(10)
  assert preempted == 0 and runner.pool.stats.hit_tokens == 2 * 16


@pytest.mark.slow
def test_preempted_requests_still_equal_generate_alone():
  """Also with decode on the per-layer weight views (the engine's single-CPU decode path)."""
  got, runner, preempted = _serve(num_pages=12, new_tokens=10, views=True)
  assert preempted > 0
  assert got == _alone(10)


def test_a_pool_smaller_than_one_request_is_refused():
  model = _model()
  graphdef, state = nnx.split(model)
  with pytest.raises(ValueError, match=r"cannot hold one --max-context 64 request \(8 pages plus the null page\)"):
    PagedRunner(graphdef, state, model.cfg, num_pages=8, page_size=8, max_batch=2, max_context=64)


@pytest.mark.slow
def test_multi_step_decode_equals_generate_alone():
  """Several decode steps per device call (``decode_steps``: sampling on device, n capped by the room in
  the pages held) give the tokens of one step per call, here through preemption under a tight pool."""
  got, runner, preempted = _serve(num_pages=12, new_tokens=10, steps=16)
  assert preempted > 0
  assert got == _alone(10)
  with pytest.raises(ValueError, match="do not fit the sequences' pages"):
    seq = runner.admit(99, [1, 2, 3])
    runner.decode_steps([seq], lambda R: RowSettings.of([(0.0, 0, 1.0, 0, 0)] * R), [0], runner.room([seq]) + 1)
