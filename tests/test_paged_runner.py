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
from reference import FP32, sharp_model


@functools.lru_cache
def _model():
  return sharp_model(4, **FP32)


def _prompts():
  rng = np.random.default_rng(0)
  shared = [int(t) for t in rng.integers(1, 1000, 21)]
  return [shared + [int(t) for t in rng.integers(1, 1000, n)] for n in (4, 1, 11)] + [[5, 6, 7]]


@functools.lru_cache
def _alone(new_tokens):
  out = mj.generate(_model(), _prompts(), new_tokens, eos_id=None)
  return [list(map(int, t)) for t in out.tokens]


def _prefill_batched(runner, seqs, calls, wide=False):
  """Every one of ``seqs`` prefilled through ``prefill_many`` (several per call, the oldest first),
  each sampling its first token once wholly in the cache; ``calls`` gets each call's row count.
  ``wide``: no sequence decodes, so the calls take the wide budget (every row)."""
  pending = list(seqs)
  while pending:
    taken, logits_RV = runner.prefill_many(pending, wide=wide)
    calls.append(len(taken))
    done = [seq for seq in taken if seq.computed == len(seq.tokens)]
    for seq, logits_V in zip(taken, np.asarray(logits_RV)):
      if seq in done:
        runner.append(seq, int(np.argmax(logits_V)))
    pending = [s for s in pending if s not in done]


def _serve(num_pages, new_tokens, max_batch=4, views=False, steps=1, prompts=None, prefill_chunk=16, calls=None):
  """A minimal greedy loop over the runner: admit in order, prefill, decode what is admitted (with
  ``steps`` > 1: up to that many decode steps per device call, sampling on device). With ``calls`` (a
  list) the admitted sequences prefill together (``prefill_many``), else one by one."""
  model = _model()
  graphdef, state = nnx.split(model)
  runner = PagedRunner(graphdef, state, model.cfg, num_pages=num_pages, page_size=8, max_batch=max_batch,
                       max_context=64, prefill_chunk=prefill_chunk, layers=layer_views(model) if views else None)
  waiting = [(i, list(p)) for i, p in enumerate(prompts or _prompts())]
  lengths = {i: len(p) for i, p in waiting}
  running, out, preempted = [], {}, 0
  while waiting or running:
    admitted = []
    while waiting and len(running) + len(admitted) < max_batch:
      seq = runner.admit(*waiting[0])
      if seq is None:
        break
      waiting.pop(0)
      admitted.append(seq)
      logits = None
      while calls is None and logits is None:  # one by one, before the next admission
        logits = runner.prefill(seq)
      if logits is not None:
        runner.append(seq, int(np.argmax(logits)))
    if calls is not None:
      _prefill_batched(runner, admitted, calls, wide=not running)
    running += admitted
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


def _mixed_prompts():
  """Different lengths (3 to 37 tokens: one to three prefill chunks), three sharing a 17-token prefix."""
  rng = np.random.default_rng(3)
  shared = [int(t) for t in rng.integers(1, 1000, 17)]
  return ([shared + [int(t) for t in rng.integers(1, 1000, n)] for n in (20, 2, 9)] +
          [[int(t) for t in rng.integers(1, 1000, n)] for n in (3, 30, 12)])


@functools.lru_cache
def _each_alone(new_tokens):
  """Each prompt on its own through ``generate`` (a batch of one, contiguous cache)."""
  return [[int(t) for t in mj.generate(_model(), [p], new_tokens, eos_id=None).tokens[0]] for p in _mixed_prompts()]


@pytest.mark.parametrize("views", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_batched_prefill_with_prefix_hits_and_preemption_equals_each_sequence_alone(views):
  """``prefill_many``: the admitted sequences' chunks run together (different lengths, so rows of one
  call end at different columns, and long prompts take several calls), beside prefix-cache hits and
  under a pool so tight that sequences are preempted and prefilled again from their tokens so far; each
  sequence's greedy tokens equal ``generate`` on its prompt alone. ``views``: steps of at most
  ``moe_block`` tokens run on the per-layer weight views (the engine's single-CPU path). The first
  admissions prefill while nothing decodes (the wide budget: 3 rows of 32 columns), the later ones
  beside decoding sequences (the 32-token budget)."""
  calls = []
  got, runner, preempted = _serve(num_pages=14, new_tokens=10, max_batch=3, views=views, prompts=_mixed_prompts(),
                                  prefill_chunk=32, calls=calls)
  assert max(calls) == 3  # every row in one call: a wide step (a busy one holds 2 rows at most)
  assert preempted > 0 and runner.pool.stats.hit_tokens > 0
  assert got == _each_alone(10)


def test_plan_prefill_takes_the_most_real_tokens_under_the_budget():
  from mixtral_jax.inference.pages import Sequence  # noqa: PLC0415
  from mixtral_jax.inference.paged_batch import plan_prefill, prefill_shapes  # noqa: PLC0415
  seq = lambda n, computed=0: Sequence(0, [1] * n, computed=computed)  # noqa: E731
  sizes = (1, 2, 4, 8, 16)
  assert plan_prefill([seq(2000)], 256, sizes) == (1, 256)  # a long prompt takes the budget alone
  assert plan_prefill([seq(2000), seq(10)], 256, sizes) == (1, 256)  # 256 real tokens beat 128 + 10
  assert plan_prefill([seq(10)] * 16, 256, sizes) == (16, 16)  # sixteen short prompts share one call
  assert plan_prefill([seq(100), seq(60, computed=20), seq(30)], 256, sizes) == (2, 128)  # 140 beat 64 + 40 + 30
  assert plan_prefill([seq(50), seq(40), seq(30)], 256, sizes) == (3, 64)  # rows padded to 4 x 64
  assert plan_prefill([seq(200), seq(60)], 128, sizes) == (1, 128)  # 128 beat 64 + 60
  # Wide (few decode): every row, each of at most the busy budget's columns.
  lengths = [14, 18, 31, 37, 43, 46, 52, 56, 63, 65, 80, 85, 97, 101, 118, 128]
  assert plan_prefill([seq(n) for n in lengths], 256, sizes, wide=True) == (16, 128)  # a burst in one call
  assert plan_prefill([seq(n) for n in lengths], 256, sizes) == (16, 16)  # busy: their first 16 tokens
  assert plan_prefill([seq(2000)], 256, sizes, wide=True) == (1, 256)  # columns stay within the budget
  assert plan_prefill([seq(10)] * 3, 256, sizes, wide=True) == (3, 16)
  # Busy shapes: R * C <= 64 (C <= 32 columns of context); wide ones: C <= 64 and R * C <= 8 * 64.
  assert prefill_shapes(64, (1, 2, 4, 8), 32) == [(1, 16), (1, 32), (2, 16), (2, 32), (4, 16), (4, 32), (8, 16),
                                                  (8, 32)]


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
