"""Text generation: prefill, then decode one token at a time with a preallocated KV cache.

``generate`` is a client of the serving engine (:mod:`mixtral_jax.inference.engine`): it submits all
its prompts at once to an engine of its own and steps the engine's loop on this thread until every
row has finished. So generation has one prefill program, one decode program and one sampler
(:mod:`mixtral_jax.inference.programs`, :mod:`mixtral_jax.sampling`). For a batch of prompts:

  1. Shapes. The batch is padded to a power of two rows (rounded up to a multiple of the mesh's batch
     shards). The cache holds S = bucket(longest prompt + max_new_tokens, 16) slots (at most the
     model's context), or the sliding window when that is smaller (then it rolls).
  2. Prefill: all rows together, in chunks of at most ``prefill_chunk`` columns, each row's chunk
     right-padded to a power of two >= 16 (one compilation per width), every row at its own
     positions 0, 1, ... Each chunk attends to the cache written by the chunks before it, which is
     exact (see ``mixtral_jax.attention``), also for a rolling cache shorter than the prompt; a row's
     last chunk samples its first new token from its last prompt column only.
  3. Decode: a jitted loop of up to MAX_CHUNK steps per device call (one token per row, the cache
     donated so it is updated in place), the chunk length traced (one compilation) and adapted to
     about CHUNK_SECONDS of device time, so tokens still stream in small bursts; the next call is
     dispatched before the last one is read back (the engine's pipelining). On a single CPU
     device the step runs the layers unrolled over zero-copy per-layer, per-expert views of the
     stacked weights (``model.layer_views``).
  4. A row finishes at EOS (excluded from its tokens), when its text contains a stop string (text
     truncated before it), or after ``max_new_tokens``; the call returns when every row has finished.

Sampling (greedy / temperature / top-k / top-p) is :mod:`mixtral_jax.sampling`; row i of a call draws
with the key index i, so its tokens depend on the seed, the step and i, not on the batch padding.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from mixtral_jax.inference.engine import Engine, Request
from mixtral_jax.inference.placement import resolve_mesh
from mixtral_jax.inference.programs import bucket
from mixtral_jax.model import Mixtral
from mixtral_jax.sampling import Sampling

StreamFn = Callable[[int, "int | None", str], None]

_MODEL_EOS = object()  # default of ``eos_id``: the tokenizer's EOS, else the model config's


@dataclasses.dataclass
class Generation:
  """What :func:`generate` returns, one entry per prompt.

  ``tokens``: the new token ids (no prompt, no EOS). ``texts``: their decoded text, cut before a stop
  string (None without a tokenizer). ``finish_reasons``: "eos", "stop" or "length".
  """
  tokens: list[list[int]]
  finish_reasons: list[str]
  texts: list[str] | None = None


PREFILL_CHUNK = 2048  # prompt columns per prefill call, at most (a power of two; see generate)


def prefill_chunk_size(prompt_len: int, prefill_chunk: int) -> int:
  """Columns per prefill call for a prompt of ``prompt_len`` tokens padded to a power of two: the
  smaller of that and ``prefill_chunk`` (a power of two), so the chunks split it evenly."""
  if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
    raise ValueError(f"prefill_chunk must be a power of two >= 1, got {prefill_chunk}")
  return min(prompt_len, prefill_chunk)


# ------------------------------------------------------------------------------ input checks


def _as_token_lists(prompts, tokenizer) -> list[list[int]]:
  if isinstance(prompts, np.ndarray):
    prompts = prompts.tolist()
  if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                  and isinstance(prompts[0], (int, np.integer))):
    prompts = [prompts]  # a single prompt
  prompts = list(prompts)
  if not prompts:
    raise ValueError("generate() needs at least one prompt")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if tokenizer is None:
        raise ValueError(f"prompt {i} is text but no tokenizer was given; pass tokenizer= or token ids")
      p = tokenizer.encode(p, bos=True)
    out.append([int(t) for t in p])
  return out


def _check_prompts(prompts: list[list[int]], max_new_tokens: int, cfg) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  context = cfg.max_position_embeddings
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the BOS token)")
    bad = [t for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    if len(p) > context:
      raise ValueError(f"prompt {i} has {len(p)} tokens, longer than the model's context of {context} "
                       f"(max_position_embeddings); shorten it")
    if len(p) + max_new_tokens > context:
      raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                       f"context of {context}; ask for at most {context - len(p)} new tokens")


def _eos_set(eos_id, tokenizer, cfg) -> frozenset[int]:
  if eos_id is _MODEL_EOS:
    eos_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
  if eos_id is None:
    return frozenset()
  return frozenset([int(eos_id)] if isinstance(eos_id, (int, np.integer)) else (int(e) for e in eos_id))


def _batch_shards(mesh) -> int:
  if mesh is None:
    return 1
  return math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp", "expert"))


# ------------------------------------------------------------------------------ public API


def generate(model: Mixtral, prompts, max_new_tokens: int = 128, *, tokenizer=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop: str | Iterable[str] | None = None, eos_id=_MODEL_EOS, mesh=None,
             stream: StreamFn | None = None, prefill_chunk: int = PREFILL_CHUNK) -> Generation:
  """Generates up to ``max_new_tokens`` tokens after each prompt (see the module docstring).

  Args:
    model: a :class:`Mixtral` (e.g. from ``mixtral_jax.from_pretrained``).
    prompts: token-id lists, or strings when ``tokenizer`` is given (one prompt alone is accepted too).
    tokenizer: a ``mixtral_jax.tokenizer.Tokenizer``, or a name/path for ``Tokenizer.load``.
    temperature, top_k, top_p: sampling (temperature 0 is greedy); ``seed`` makes it reproducible.
    stop: string(s) that end a row when they appear in its text (needs a tokenizer).
    eos_id: token id(s) that end a row; default the tokenizer's EOS, else ``model.cfg.eos_token_id``;
      None never stops on a token.
    mesh: a ``jax.sharding.Mesh`` or a spec such as ``"expert=4"``; parameters not already placed
      on it are sharded by their logical axes, and the steps run under it.
    stream: called as ``stream(row, token, text)`` for every new token of every unfinished row, with
      the newly printable text ("" without a tokenizer); a last call with ``token=None`` may flush
      text held back while it could have been the start of a stop string.
    prefill_chunk: prompt columns per prefill call, at most (a power of two); bounds prefill's
      activation memory to that many tokens per row.
  """
  if isinstance(tokenizer, (str, os.PathLike)):
    from mixtral_jax.tokenizer import Tokenizer  # noqa: PLC0415  (sentencepiece only when asked for)
    tokenizer = Tokenizer.load(tokenizer)
  cfg = model.cfg
  if tokenizer is not None:
    tokenizer.check_vocab(cfg.vocab_size)
  stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
  if stop and tokenizer is None:
    raise ValueError("stop strings need a tokenizer to decode the generated text; pass tokenizer=")
  if any(not s for s in stop):
    raise ValueError("stop strings must be non-empty")
  sampling = Sampling(float(temperature), top_k, top_p)
  token_lists = _as_token_lists(prompts, tokenizer)
  _check_prompts(token_lists, max_new_tokens, cfg)
  prefill_chunk_size(1, prefill_chunk)  # checks it
  eos = _eos_set(eos_id, tokenizer, cfg)
  mesh = resolve_mesh(mesh, cfg)

  n = len(token_lists)
  B = -(-bucket(n) // _batch_shards(mesh)) * _batch_shards(mesh)
  context = min(bucket(max(map(len, token_lists)) + max_new_tokens, 16), cfg.max_position_embeddings)
  engine = Engine(model, tokenizer, max_batch=B, max_context=context, max_queue=0, prefill_chunk=prefill_chunk,
                  mesh=mesh, decode_views_wanted=max_new_tokens > 1)
  finish: list[str | None] = [None] * n
  requests = [_request(i, p, max_new_tokens, sampling, seed, eos, stop, stream, finish)
              for i, p in enumerate(token_lists)]
  for req in requests:
    engine.submit(req)
  engine.run_until_done()
  return Generation(tokens=[r.row.tokens for r in requests], finish_reasons=finish,
                    texts=[r.row.text for r in requests] if tokenizer is not None else None)


def _request(i, prompt, max_new_tokens, sampling: Sampling, seed, eos, stop, stream, finish) -> Request:
  """Prompt ``i`` as an engine request: its key index is ``i`` (see ``mixtral_jax.sampling``), its
  tokens stream as ``stream(i, token, text)``, and its finish reason lands in ``finish[i]``."""
  def on_token(token, delta):
    if stream is not None:
      stream(i, token, delta)

  def on_done(reason, _error):  # errors raise from the engine's step, on generate's thread
    finish[i] = reason

  return Request(prompt, max_new_tokens, on_token, on_done, temperature=sampling.temperature,
                 top_k=sampling.top_k or 0, top_p=1.0 if sampling.top_p is None else sampling.top_p, seed=seed,
                 index=i, stop=stop, eos=eos)
