"""The engine's loop over the paged KV cache (``kv_cache_gib``): one iteration of
:class:`~mixtral_jax.inference.engine.Engine` when it holds a :class:`PagedRunner`.

Each iteration (:meth:`PagedSteps._paged_step`):

  1. Cancelled requests leave the queue or free their pages.
  2. Waiting requests are admitted, first come first served, while rows and pages last (each reusing the
     longest cached prefix of its tokens).
  3. Prefill: ONE device call runs the next chunk of several admitted requests still reading their
     tokens, the oldest first, at most ``prefill_chunk`` tokens in all, padding included
     (:meth:`PagedRunner.prefill_many`): sixteen short prompts share one call, a 2k prompt takes the
     budget alone for several iterations. So a decode step never waits for more than one budget of
     prefill. While at least as many requests prefill as decode, the call may take every row of up to
     ``prefill_chunk`` columns (:meth:`PagedSteps._paged_wide`): a burst of arrivals prefills in one call
     and then decodes in lockstep, as ``generate`` does, even when its first request came a moment
     before the rest and already decodes. A request whose last chunk ran samples its next token and
     joins decode at once.
  4. Decode: the requests that read all their tokens run a decode step, compacted into the first rows of
     the next compiled batch size; several steps per device call (about CHUNK_SECONDS of device time,
     at most BUSY_CHUNK while a request waits or prefills, 1 when a row needs host work between steps:
     ``_paged_chunk``). Before it, when pages run out, the newest requests are
     preempted: their pages are freed and they wait at the head of the queue, to be recomputed from their
     prompt and the tokens so far (mostly from the prefix cache).

Why decode is a call of its own rather than 1-column rows of the prefill step (vLLM's chunked prefill
packs them in one flat batch of tokens): our steps are [R, C] rectangles, so a decode row in a prefill
step would cost C columns of compute (16 at least) for one token, where on CPU, compute-bound, the
separate decode call costs one dispatch. A flat token batch needs attention with one page table per
token, not per row.

``timing`` counts, for the benchmarks, the prefill and decode calls, their tokens and their wall time
(host bookkeeping and sampling included).

The class is a mixin: it uses the Engine's queue, lock, metrics, sampler and callbacks (``waiting``,
``_wake``, ``metrics``, ``_settings``, ``_sample``, ``_finish``, ...), so the Engine's own module keeps
the fixed-row loop only.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from mixtral_jax.inference.logprobs import rows_to_host
from mixtral_jax.inference.placement import mesh_context
from mixtral_jax.inference.programs import CHUNK_SECONDS, MAX_CHUNK

BUSY_CHUNK = 8  # decode steps per call, at most, while a request waits or prefills


class PagedSteps:
  """The paged iteration of the Engine (see the module docstring)."""

  def _paged_step(self) -> None:
    """One iteration over the paged cache (see the module docstring)."""
    self._paged_admit()
    with mesh_context(self.mesh):
      t0 = time.perf_counter()
      tokens = self._paged_prefill()
      if tokens:
        self._count("prefill", tokens, t0)
      decoding = self._paged_make_room([r for r in self.running if not self._paged_prefilling(r)])
      if decoding:
        t0, n = time.perf_counter(), self._paged_chunk(decoding)
        if n > 1:
          self._paged_decode_steps(decoding, n)
        else:
          self._paged_sample(decoding, self.runner.decode([self.seqs[r.id] for r in decoding]))
        self.metrics.decode_steps += n
        self.metrics.occupied_row_steps += n * len(decoding)
        # rounded up: a 1-step call of 50-100 ms (16 rows on a loaded CPU) would otherwise keep n at 1,
        # and n steps per call cost less than n calls (one sampling dispatch and read-back per call)
        self._chunk = max(1, min(MAX_CHUNK, math.ceil(CHUNK_SECONDS * n / max(time.perf_counter() - t0, 1e-6))))
        self._count("decode", n * len(decoding), t0)

  def _count(self, kind: str, tokens: int, t0: float) -> None:
    self.timing[f"{kind}_calls"] += 1
    self.timing[f"{kind}_tokens"] += tokens
    self.timing[f"{kind}_s"] += time.perf_counter() - t0

  def _paged_admit(self) -> None:
    """Cancelled requests leave; waiting ones are admitted in order while rows and pages last."""
    with self._wake:
      for req in [r for r in self.waiting if r.cancelled]:
        self.waiting.remove(req)
        self._finish(req, "cancelled")
      for req in [r for r in self.running if r.cancelled]:
        self._paged_free(req, "cancelled")
      while self.waiting and len(self.running) < self.B:
        req = self.waiting[0]
        seq = self.runner.admit(req.id, req.prompt + req.row.tokens, req.adapter)
        if seq is None:
          break
        self.waiting.popleft()
        self.seqs[req.id] = seq
        self.running.append(req)

  def _paged_prefill(self) -> int:
    """One prefill call over the prefilling requests (oldest first, as many as the token budget gives);
    those whose tokens are now all in the cache sample their next token. Returns the tokens computed."""
    prefilling = [r for r in self.running if self._paged_prefilling(r)]
    if not prefilling:
      return 0
    seqs = [self.seqs[r.id] for r in prefilling]
    before = [s.computed for s in seqs]
    taken, logits_RV = self.runner.prefill_many(seqs, wide=self._paged_wide(len(prefilling)))
    done = [req if seq.computed == len(seq.tokens) else None for req, seq in zip(prefilling, taken)]
    if any(done):
      self._paged_sample(done, logits_RV)
    return sum(s.computed - b for s, b in zip(taken, before))

  def _paged_wide(self, prefilling: int) -> bool:
    """Whether the next prefill call may take the wide budget (every row of up to ``prefill_chunk``
    columns): when at least as many requests prefill as decode. The budget bounds how long decoding
    requests wait for a prefill call; when they are the fewer, one larger call that brings the others
    into their batch costs them less than the half-empty decode steps of many small calls would. Why not
    only when none decodes: sixteen clients' requests reach the server over some milliseconds, and the
    first, prefilled alone, already decodes when the other fifteen are admitted."""
    return 2 * prefilling >= len(self.running)

  def _paged_make_room(self, decoding: list) -> list:
    """Grows the decoding requests' pages for their next token; the preempted (newest first when pages
    run out) go back to the head of the queue. Returns the requests that still decode."""
    for victim in self.runner.ensure_room([self.seqs[r.id] for r in decoding]):
      req = next(r for r in decoding if self.seqs[r.id] is victim)
      decoding.remove(req)
      self.running.remove(req)
      del self.seqs[req.id]
      with self._wake:
        self.waiting.appendleft(req)
    return decoding

  def _paged_chunk(self, decoding: list) -> int:
    """Decode steps for this call: 1 when a row needs host work between steps (a grammar mask, logprobs);
    else the adapted chunk length (about CHUNK_SECONDS of device time), at most BUSY_CHUNK while anything
    waits or prefills (so one prefill call, and the admission of new arrivals, comes at least every
    BUSY_CHUNK steps), and capped by the fewest tokens any row may still produce and by the room in the
    rows' pages. Why not 1 step while busy: with many clients something nearly always waits or
    prefills, and one step per call then pays a dispatch and the host's bookkeeping per token."""
    if any(r.matcher is not None or r.top_logprobs is not None for r in decoding):
      return 1
    most = self._chunk
    if self.waiting or len(decoding) < len(self.running):
      most = min(most, BUSY_CHUNK)
    left = min(r.max_tokens - len(r.row.tokens) for r in decoding)
    return max(1, min(most, left, self.runner.room([self.seqs[r.id] for r in decoding])))

  def _paged_decode_steps(self, reqs: list, n: int) -> None:
    """``n`` decode steps in one device call (sampling on device); each row's tokens pass through its
    bookkeeping in order until it finishes (tokens computed past its end are dropped with its pages)."""
    settings_of = lambda R: self._settings(list(reqs) + [None] * (R - len(reqs)))  # noqa: E731
    out_nS = self.runner.decode_steps([self.seqs[r.id] for r in reqs], settings_of,
                                      [len(r.row.tokens) for r in reqs], n)
    for r, req in enumerate(reqs):
      for token in out_nS[:, r].tolist():
        req.row.push(token, is_last_step=len(req.row.tokens) + 1 >= req.max_tokens)
        if req.row.finish is not None:
          self._paged_free(req, req.row.finish)
          break

  def _paged_prefilling(self, req) -> bool:
    """Whether more than the last token is still to be computed (that one a decode step feeds)."""
    seq = self.seqs[req.id]
    return seq.computed < len(seq.tokens) - 1

  def structured(self):
    """The structured-output compiler for this engine's tokenizer (llguidance, loaded when first used)."""
    if self._structured is None:
      from mixtral_jax.inference.grammar import StructuredOutput, apply_bitmask  # noqa: PLC0415 - llguidance when used
      self._structured = StructuredOutput(self.tokenizer)
      self._apply_mask = jax.jit(apply_bitmask)
    return self._structured

  def _paged_sample(self, reqs: list, logits_RV) -> None:
    """Samples the next token of the request of each row of ``logits_RV`` (``reqs[r]``; None, or rows
    past ``reqs``: nothing to sample) at its step (the tokens it has so far, as ``generate`` counts) and
    passes it on; a finished request frees its pages. Grammar masks are filled on the host while the
    device still computes ``logits_RV`` (they depend only on the tokens so far), then applied."""
    padded = list(reqs) + [None] * (logits_RV.shape[0] - len(reqs))
    steps_R = np.array([len(r.row.tokens) if r else 0 for r in padded], np.int32)
    raw_RV = logits_RV
    if any(r is not None and r.matcher is not None for r in padded):
      from mixtral_jax.inference.grammar import MaskBatch  # noqa: PLC0415
      bits = MaskBatch(len(padded), self.structured().vocab_size).fill([r and r.matcher for r in padded])
      logits_RV = self._apply_mask(logits_RV, bits)
    tokens_R = self._sample(logits_RV, self._settings(padded), steps_R)
    wanted = [r and r.top_logprobs for r in padded]
    entries = [None] * len(padded)
    if any(k is not None for k in wanted):  # the raw distribution's, before temperature and filters
      entries = rows_to_host(*self._logprobs(raw_RV, tokens_R), tokens_R, wanted)
    for req, token, entry in zip(padded, np.asarray(tokens_R).tolist(), entries):
      if req is not None:
        self._paged_take(req, token, entry)

  def _paged_take(self, req, token: int, entry) -> None:
    """A sampled token's bookkeeping: logprobs, the grammar matcher, the sequence, the stream."""
    if entry is not None and token not in req.eos:
      req.logprobs.append(entry)
    if req.matcher is not None and token not in req.eos:
      req.matcher.consume_token(token)
    if req.first_token_at is None:
      self.metrics.prompt_tokens += len(req.prompt)
    self.runner.append(self.seqs[req.id], token)
    req.row.push(token, is_last_step=len(req.row.tokens) + 1 >= req.max_tokens)
    if req.row.finish is not None:
      self._paged_free(req, req.row.finish)

  def _paged_free(self, req, reason: str) -> None:
    self.runner.release(self.seqs.pop(req.id))
    self.running.remove(req)
    self._finish(req, reason)
