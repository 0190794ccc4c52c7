"""The engine over a paged KV cache (``kv_cache_gib``): every request's tokens equal ``generate`` alone
on the same weights, greedy and sampled, with prompts that share a prefix (reused from the prefix
cache), with a pool so small that requests are preempted and recomputed, and with one request on a
many-row engine (decoded as a batch of one)."""

import functools

import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.inference.engine import Engine, Request
from reference import TINY

PAGE = 8


@functools.lru_cache
def _model():
  cfg = mj.MixtralConfig(**{**TINY, "param_dtype": "float32", "dtype": "float32"})
  model = mj.Mixtral(cfg, rngs=nnx.Rngs(5))
  model.blocks.moe.router_DE[...] = model.blocks.moe.router_DE[...] * 20
  return model


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
