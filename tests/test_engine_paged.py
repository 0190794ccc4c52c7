"""The engine over a paged KV cache (``kv_cache_gib``): every request's tokens equal ``generate`` alone
on the same weights, greedy and sampled, with prompts that share a prefix (reused from the prefix
cache), with a pool so small that requests are preempted and recomputed, and with one request on a
many-row engine (decoded as a batch of one)."""

import functools

import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.inference import paged_engine
from mixtral_jax.inference.engine import Engine, Request
from mixtral_jax.inference.requests import QueueFull
from reference import FP32, sharp_model

PAGE = 8


@functools.lru_cache
def _model():
  return sharp_model(5, **FP32)


def _gib(pages):
  cfg = _model().cfg
  return pages * PAGE * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * 4 / 2**30


def _prompts():
  rng = np.random.default_rng(1)
  shared = [int(t) for t in rng.integers(1, 1000, 19)]
  return [shared + [int(t) for t in rng.integers(1, 1000, n)] for n in (6, 1, 13)] + [[9, 8, 7, 6, 5]]


def _run(engine, prompts, new_tokens, **sampling):
  out = {}
  for i, p in enumerate(prompts):
    engine.submit(Request(list(p), new_tokens, lambda *_: None,
                          functools.partial(lambda i, req_box, *_: out.__setitem__(i, req_box[0].row.tokens), i, box := []),
                          **sampling))
    box.append(engine.waiting[-1])
  engine.run_until_done()
  return [out[i] for i in range(len(prompts))]


@functools.lru_cache
def _alone(prompt, new_tokens, temperature=0.0, top_k=None, seed=0):
  out = mj.generate(_model(), [list(prompt)], new_tokens, eos_id=None, temperature=temperature, top_k=top_k, seed=seed)
  return [int(t) for t in out.tokens[0]]


@pytest.mark.slow
def test_paged_engine_greedy_equals_generate_alone_with_prefix_reuse():
  engine = Engine(_model(), max_batch=4, max_context=64, prefill_chunk=16, kv_cache_gib=_gib(40), page_size=PAGE)
  first = _run(engine, _prompts()[:1], 9)  # its full pages enter the prefix cache
  got = first + _run(engine, _prompts()[1:], 9)  # the others share its first 16 tokens
  assert got == [_alone(tuple(p), 9) for p in _prompts()]
  stats = engine.runner.pool.stats
  assert stats.hit_tokens == 2 * 16 and stats.preempted == 0
  assert engine.runner.pool.available() == engine.runner.pool.num_pages - 1  # every page back


@pytest.mark.slow
def test_paged_engine_preempts_and_still_equals_generate_alone_sampled():
  engine = Engine(_model(), max_batch=4, max_context=64, prefill_chunk=16, kv_cache_gib=_gib(11), page_size=PAGE)
  got = _run(engine, _prompts(), 12, temperature=0.8, top_k=50, seed=7)
  assert engine.runner.pool.stats.preempted > 0
  assert got == [_alone(tuple(p), 12, temperature=0.8, top_k=50, seed=7) for p in _prompts()]


@pytest.mark.slow
def test_one_request_on_a_many_row_engine_decodes_one_row():
  engine = Engine(_model(), max_batch=16, max_context=64, prefill_chunk=16, kv_cache_gib=_gib(20), page_size=PAGE)
  got = _run(engine, _prompts()[:1], 6)
  assert got == [_alone(tuple(_prompts()[0]), 9)[:6]]
  assert engine.metrics.occupied_row_steps == engine.metrics.decode_steps  # one row per decode step


@pytest.mark.slow
def test_engine_prefills_several_requests_per_call_and_still_equals_generate_alone():
  """All four requests arrive at once: one prefill call runs the chunks of several (prefill_chunk 64
  tokens in all), beside preemption under a tight pool; each equals ``generate`` alone."""
  engine = Engine(_model(), max_batch=4, max_context=64, prefill_chunk=64, kv_cache_gib=_gib(11), page_size=PAGE)
  got = _run(engine, _prompts(), 12)
  assert got == [_alone(tuple(p), 12) for p in _prompts()]
  assert engine.runner.pool.stats.preempted > 0
  one_at_a_time = sum(-(-len(p) // 64) for p in _prompts())  # prefill calls with one request per call
  assert engine.timing["prefill_calls"] < one_at_a_time + engine.runner.pool.stats.preempted
  assert engine.timing["prefill_tokens"] >= sum(map(len, _prompts()))


def test_a_burst_behind_one_decoding_request_prefills_in_one_wide_call():
  """The first of four requests is prefilled alone and decodes when the other three arrive. They
  outnumber it, so one prefill call takes all three (the wide budget: 4 rows of 16 columns, where the
  16-token busy budget holds one row), as a burst of clients reaching a server a moment apart is
  prefilled together; each output still equals ``generate`` alone."""
  engine = Engine(_model(), max_batch=4, max_context=64, prefill_chunk=16, kv_cache_gib=_gib(40), page_size=PAGE)
  calls, real = [], engine.runner.prefill_many

  def spy(seqs, wide=False):
    taken, logits_RV = real(seqs, wide)
    calls.append((len(taken), wide))
    return taken, logits_RV

  engine.runner.prefill_many = spy
  prompts, out = [[9, 8, 7, 6, 5], [4, 3, 2], [7, 7, 1, 2, 3, 4], [11, 12]], {}
  _submit(engine, out, 0, prompts[0], 8)
  engine.step()
  for i in (1, 2, 3):
    _submit(engine, out, i, prompts[i], 8)
  engine.run_until_done()
  assert calls == [(1, True), (3, True)], calls
  assert [out[i] for i in range(4)] == [_alone(tuple(p), 8) for p in prompts]


def _submit(engine, out, i, prompt, new_tokens):
  """Queues ``prompt``; its tokens land in ``out[i]`` when it finishes."""
  box = []
  engine.submit(Request(list(prompt), new_tokens, lambda *_: None, lambda *_: out.__setitem__(i, box[0].row.tokens)))
  box.append(engine.waiting[-1])


@pytest.mark.slow
def test_arrivals_between_steps_decode_several_steps_per_call_while_others_prefill(monkeypatch):
  """Requests arrive between steps while others decode; a 100-token prompt prefills over 7 calls of 16
  tokens. Decode calls meanwhile run several steps (at most BUSY_CHUNK), and each greedy output still
  equals ``generate`` alone. CHUNK_SECONDS is made huge so the chunk length does not hang on this
  machine's timing."""
  monkeypatch.setattr(paged_engine, "CHUNK_SECONDS", 1e3)
  engine = Engine(_model(), max_batch=4, max_context=128, prefill_chunk=16, kv_cache_gib=_gib(60), page_size=PAGE)
  calls = []  # (steps of the call, requests still prefilling then)
  decode_steps = engine.runner.decode_steps

  def spy(seqs, settings_of, steps, n):
    calls.append((n, len(engine.running) - len(seqs)))
    return decode_steps(seqs, settings_of, steps, n)

  engine.runner.decode_steps = spy
  rng = np.random.default_rng(3)
  prompts = [[9, 8, 7, 6, 5], [int(t) for t in rng.integers(1, 1000, 100)], _prompts()[1], _prompts()[0]]
  news = [40, 12, 10, 8]
  out = {}
  _submit(engine, out, 0, prompts[0], news[0])
  engine.step()
  engine.step()
  for i in (1, 2, 3):  # each arrives while the earlier ones decode (or the long one still prefills)
    _submit(engine, out, i, prompts[i], news[i])
    engine.step()
  engine.run_until_done()
  assert [out[i] for i in range(4)] == [_alone(tuple(p), n) for p, n in zip(prompts, news)]
  busy = [n for n, prefilling in calls if prefilling]
  assert busy and max(busy) > 1, calls  # multi-step decode while a request prefilled
  assert max(busy) <= paged_engine.BUSY_CHUNK, calls


@pytest.mark.slow
def test_paged_submit_counts_running_requests_as_busy_rows():
  """max_batch 2, max_queue 1: two requests run, a third waits, the fourth is refused (before the fix the
  paged path counted both rows free, as it never fills the fixed-row ``slots``)."""
  engine = Engine(_model(), max_batch=2, max_queue=1, max_context=64, prefill_chunk=16, kv_cache_gib=_gib(20),
                  page_size=PAGE)
  out = {}
  _submit(engine, out, 0, [9, 8, 7, 6, 5], 20)
  _submit(engine, out, 1, [4, 3, 2], 20)
  engine.step()
  assert len(engine.running) == 2 and not engine.waiting
  _submit(engine, out, 2, [1, 2, 3], 4)
  with pytest.raises(QueueFull):
    _submit(engine, out, 3, [5, 6, 7], 4)
  assert engine.metrics.rejected == 1
  engine.run_until_done()
  assert sorted(out) == [0, 1, 2]
