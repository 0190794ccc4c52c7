"""Text generation: prefill, then decode one token at a time with a preallocated KV cache.

Algorithm, for a batch of prompts of different lengths:

  1. Shape buckets. The batch is padded to a power of two rows (rounded up to a multiple of the mesh's
     batch shards) and the prompts are *left*-padded to a power-of-two length P >= 16, so that every
     prompt ends at column P-1. The cache holds S = bucket(longest prompt + max_new_tokens) slots, or
     the sliding window when that is smaller (then it rolls). Compilation happens once per
     (batch bucket, P, S, sampling settings); the decode step has fixed shapes and is compiled once.
  2. Positions are per sequence: the cumulative sum of the attention mask minus one, as transformers
     computes them, so a prompt's first real token is at position 0 whatever its padding.
  3. Prefill runs the prompts through ``model.hidden(..., cache=)`` in chunks of C = min(P,
     ``prefill_chunk``) columns (both powers of two, so C divides P; one compilation per C), so a long
     prompt never goes through the model in one piece: activations scale with B x C, not B x P. Each
     chunk attends to the cache written by the chunks before it, which is exact (see
     ``mixtral_jax.attention``), also for a rolling cache shorter than the prompt. The last chunk
     samples the first new token from the logits of column P-1 only (the LM head never sees the
     other columns).
  4. Decode: a jitted loop of up to MAX_CHUNK steps (one token per row at position
     ``len(prompt) + i``, the cache donated so it is updated in place) runs on device per call, so the
     host's dispatch (about 1 ms a call) is paid once per chunk. The chunk length is traced (one
     compilation) and adapted to about CHUNK_SECONDS of device time, so tokens still stream in small
     bursts and a slow model decodes one token per call. Chunk c+1 is dispatched before chunk c's
     tokens are read back, so the host's bookkeeping (EOS, stop strings, streaming) overlaps device
     work; after every row has finished, the at most two chunks in flight are discarded.
     On a single CPU device the step runs the layers unrolled over zero-copy per-layer, per-expert
     views of the stacked weights (``model.layer_views``): XLA:CPU copies any slice of an array
     before a matmul reads it, and those copies cost as much as the matmuls.
  5. A row finishes at EOS (excluded from its tokens), when its text contains a stop string (text
     truncated before it), or after ``max_new_tokens``. The loop ends when every row has finished.

Sampling (greedy / temperature / top-k / top-p) is in :mod:`mixtral_jax.sampling`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.inference.detokenize import IncrementalText
from mixtral_jax.model import Mixtral, init_cache, layer_views
from mixtral_jax.sampling import Sampling, sample

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


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return 1 << (max(n, minimum) - 1).bit_length()


# ------------------------------------------------------------------------------ compiled steps


PREFILL_CHUNK = 2048  # prompt columns per prefill call, at most (a power of two; see generate)


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(5,))
def _prefill(graphdef, state, ids_BC, mask_BC, positions_BC, cache, key, sampling: Sampling):
  """One prefill chunk: ``C`` prompt columns of every row into the cache; samples a token from the
  chunk's last column (used only after the last chunk, whose last column is every prompt's end)."""
  model = nnx.merge(graphdef, state)
  h_BCD, aux = model.hidden(ids_BC, attention_mask=mask_BC, positions=positions_BC, cache=cache)
  logits_BV = model.logits(h_BCD[:, -1:])[:, 0]
  return sample(logits_BV, key, 0, sampling), aux["cache"]


def prefill_chunk_size(prompt_len: int, prefill_chunk: int) -> int:
  """Columns per prefill call for a left-padded prompt length ``prompt_len`` (a power of two): the
  smaller of it and ``prefill_chunk`` (a power of two), so the chunks split it evenly."""
  if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
    raise ValueError(f"prefill_chunk must be a power of two >= 1, got {prefill_chunk}")
  return min(prompt_len, prefill_chunk)


MAX_CHUNK = 16  # decode steps per device call, at most
CHUNK_SECONDS = 0.1  # ... and about this much device time, so that streaming stays smooth


@functools.lru_cache(maxsize=16)
def _decode_chunk(graphdef, sampling: Sampling):
  """The jitted decode loop of one model structure and sampling setting: ``n`` <= MAX_CHUNK steps in
  a ``fori_loop`` on device, step j consuming token t_j at position p + j and sampling t_{j+1} with
  the key of step ``step + j``. Returns (the n new tokens in rows 0..n-1 of [MAX_CHUNK, B], the
  last one [B], the cache). ``n`` is traced, so every chunk length shares one compilation.

  graphdef and sampling are bound here rather than passed as static arguments because jit hashes and
  compares static arguments on every call, which for a graphdef is as slow as the rest of a dispatch.
  """

  @functools.partial(jax.jit, donate_argnums=(3,))
  def run(state, tokens_B, positions_B, cache, key, step, n, layers):
    def body(j, carry):
      # The parameters ride in the carry (unchanged): nnx's layer scan rejects modules closed over
      # from outside the loop's trace.
      tokens_B, cache, out_CB, state = carry
      model = nnx.merge(graphdef, state)
      h_B1D, aux = model.hidden(tokens_B[:, None], positions=(positions_B + j)[:, None], cache=cache,
                                layers=layers)
      tokens_B = sample(model.logits(h_B1D)[:, 0], key, step + j, sampling)
      return tokens_B, aux["cache"], out_CB.at[j].set(tokens_B), state

    out_CB = jnp.zeros((MAX_CHUNK, tokens_B.shape[0]), jnp.int32)
    tokens_B, cache, out_CB, _ = jax.lax.fori_loop(0, n, body, (tokens_B, cache, out_CB, state))
    return out_CB, tokens_B, cache

  return run


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


# ------------------------------------------------------------------------------ per-row bookkeeping


class _Row:
  """Host-side state of one sequence: its tokens, its text, and what has been streamed.

  The text is kept incrementally (:class:`mixtral_jax.inference.detokenize.IncrementalText`) and stop
  strings are searched for only where new text could complete one, so a token costs O(1) in the
  length of the reply, not O(n)."""

  def __init__(self, index: int, tokenizer, eos: frozenset[int], stop: tuple[str, ...], stream):
    self.index, self.tokenizer, self.eos, self.stop, self.stream = index, tokenizer, eos, stop, stream
    self.tokens: list[int] = []
    self.decoder = IncrementalText(tokenizer, self.tokens) if tokenizer is not None else None
    self.text = ""
    self.searched = 0  # characters of self.text already searched for stop strings (none found)
    self.streamed = 0  # characters of self.text already passed to stream
    self.finish: str | None = None
    # Text that could be the start of a stop string is held back from the stream until resolved.
    self.holdback = max((len(s) for s in stop), default=1) - 1

  def push(self, token: int, is_last_step: bool) -> None:
    if token in self.eos:
      self._finish("eos", None)
      return
    self.tokens.append(token)
    if self.decoder is not None:
      text = self.decoder.text()
      # A byte-fallback token may end mid-character: wait for the rest before taking the text.
      if not text.endswith("\ufffd"):
        self.text = text
      for s in self.stop:  # a new occurrence ends in the new text, so starts at most len(s)-1 before it
        at = self.text.find(s, max(0, self.searched - len(s) + 1))
        if at >= 0:
          self.text = self.text[:at]
          self._finish("stop", token)
          return
      self.searched = len(self.text)
    if is_last_step:
      self._finish("length", token)
      return
    self._emit(token, self.text[self.streamed:max(self.streamed, len(self.text) - self.holdback)])

  def _finish(self, reason: str, token: int | None) -> None:
    self.finish = reason
    if reason == "length" and self.decoder is not None:
      self.text = self.decoder.text()  # a trailing partial character is final now
    self._emit(token, self.text[self.streamed:])

  def _emit(self, token: int | None, delta: str) -> None:
    self.streamed += len(delta)
    if self.stream is not None and (token is not None or delta):
      self.stream(self.index, token, delta)


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
  eos = _eos_set(eos_id, tokenizer, cfg)
  mesh = _resolve_mesh(mesh, cfg)

  n = len(token_lists)
  lengths = [len(p) for p in token_lists]
  B = bucket(n)
  B = -(-B // _batch_shards(mesh)) * _batch_shards(mesh)
  P = bucket(max(lengths), 16)
  C = prefill_chunk_size(P, prefill_chunk)
  ids_BP = np.zeros((B, P), np.int32)
  mask_BP = np.zeros((B, P), np.int32)
  for i, p in enumerate(token_lists):
    ids_BP[i, P - len(p):] = p
    mask_BP[i, P - len(p):] = 1
  positions_BP = np.maximum(np.cumsum(mask_BP, axis=1) - 1, 0).astype(np.int32)
  lengths_B = np.array(lengths + [0] * (B - n), np.int32)  # padding rows: no tokens, never read

  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = _place(state, mesh)
  rows = [_Row(i, tokenizer, eos, stop, stream) for i in range(n)]
  key = jax.random.key(seed)
  with _mesh_context(mesh):
    cache = init_cache(cfg, B, bucket(max(lengths) + max_new_tokens, 16))
    for c in range(0, P, C):
      tokens, cache = _prefill(graphdef, state, jnp.asarray(ids_BP[:, c:c + C]), jnp.asarray(mask_BP[:, c:c + C]),
                               jnp.asarray(positions_BP[:, c:c + C]), cache, key, sampling)
    lengths_dev = jnp.asarray(lengths_B)
    layers = _layer_views(model, mesh) if max_new_tokens > 1 else None
    decode = _decode_chunk(graphdef, sampling)
    chunk, done, last_read = 1, 1, None  # done: tokens dispatched so far (the prefill made token 0)
    pending = (tokens[None], 1)  # device tokens [>= n, B] not yet read, and n
    while pending is not None:
      nxt = None
      if done < max_new_tokens:  # dispatch the next chunk before reading this one (see docstring)
        count = min(chunk, max_new_tokens - done)
        out, tokens, cache = decode(state, tokens, lengths_dev + done - 1, cache, key, done, count, layers)
        nxt, done = (out, count), done + count
      host, count = np.asarray(pending[0]), pending[1]
      now = time.perf_counter()
      if last_read is not None:  # steady state: one read per chunk, so this is device time per token
        chunk = max(1, min(MAX_CHUNK, int(CHUNK_SECONDS * count / (now - last_read))))
      last_read = now
      first = done - (nxt[1] if nxt else 0) - count  # index of the first token of this chunk
      for t in range(count):
        for row in rows:
          if row.finish is None:
            row.push(int(host[t, row.index]), is_last_step=first + t + 1 == max_new_tokens)
      if all(row.finish is not None for row in rows):
        break
      pending = nxt
  return Generation(tokens=[r.tokens for r in rows], finish_reasons=[r.finish for r in rows],
                    texts=[r.text for r in rows] if tokenizer is not None else None)


# ------------------------------------------------------------------------------ mesh placement


def _layer_views(model: Mixtral, mesh):
  """Zero-copy per-layer, per-expert weight arrays for the decode step on a single CPU device (see
  :func:`mixtral_jax.model.layer_views`), else None (the scanned stack)."""
  if mesh is not None:
    return None
  devices = {d for a in jax.tree.leaves(nnx.state(model.blocks)) for d in a.devices()}
  if len(devices) != 1 or next(iter(devices)).platform != "cpu":
    return None
  return layer_views(model)


def _resolve_mesh(mesh, cfg):
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  from mixtral_jax.sharding.mesh import make_mesh  # noqa: PLC0415
  return make_mesh(mesh, num_experts=cfg.num_local_experts)


def _place(state, mesh):
  """Shards parameters by their logical axes unless they already live on ``mesh``'s devices."""
  from mixtral_jax.params import param_shardings  # noqa: PLC0415  (params imports the model)
  shardings = param_shardings(state, mesh)
  return jax.tree.map(
      lambda x, s: x if getattr(x, "sharding", None) == s else jax.device_put(x, s), state, shardings)


def _mesh_context(mesh):
  import contextlib  # noqa: PLC0415
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
