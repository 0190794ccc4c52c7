"""Continuous batching: a fixed set of decode slots sharing one KV cache, fed from a request queue.

State: the model's :class:`~mixtral_jax.model.KVCache` with B = ``max_batch`` rows of S =
``max_context`` slots (rows are requests, each at its own position), and on the host, per row, the
request it serves, its last token, its next position, its sampling settings and its step count.

One thread runs the loop; each iteration:

  1. Cancelled requests (client gone) leave the queue or free their row at once.
  2. Waiting requests take free rows, first come first served.
  3. Prefill: every row still reading its prompt runs its next chunk of at most ``prefill_chunk``
     tokens (right-padded to a power of two >= 16, so few shapes compile; positions reset to -1 on
     the first chunk, so a reused row forgets its last request), all in one call of the prefill
     program (:mod:`mixtral_jax.inference.programs`): R rows (their count rounded up to a power of
     two, padded with other rows that write nothing) are cut out of the shared cache and written
     back, or, when R reaches B, all rows run over the whole cache in place. A long
     prompt thus takes several iterations, with decode steps for the others in between. The last
     chunk samples the request's first token, and the row joins the decode batch.
  4. Decode: one compiled program for all B rows (rows not decoding are masked out, so they write
     nothing), ``n`` steps per device call in a ``fori_loop``: n = 1 while anything waits or
     prefills (new requests join at the next step), else up to MAX_CHUNK, capped by the fewest
     tokens any row still may produce and sized to about CHUNK_SECONDS of device time (so tokens
     stream in small bursts and a slow model decodes one token per call). Outside the n = 1 case two
     chunks are in flight: chunk c+1 is dispatched (fed chunk c's last tokens on the device) before
     chunk c is read back, so the device does not wait for the host's bookkeeping; tokens a row
     decodes after it finished are dropped. A prefill first reads back the chunk in flight.
  5. Each new token goes through generate's per-row bookkeeping (EOS, stop strings, held-back
     streaming text) and out to the request's callback; a finished row is free for step 2 at once.

With ``kv_cache_gib`` the cache is paged instead (:class:`~mixtral_jax.inference.paged_runner.PagedRunner`):
a pool of pages that rows hold only as their tokens need, admission by free pages rather than free
rows, the longest cached prefix of a prompt reused, one prefill call for the next chunks of several
requests, decode steps over the rows in use only (compacted, padded to 1, 2, 4, ... rows), and the
newest requests preempted when pages run out. That loop is :mod:`mixtral_jax.inference.paged_engine`.

Sampling is per row (:func:`mixtral_jax.sampling.sample_rows`): each request keeps its own settings,
seed and key index, and its tokens do not depend on the other rows. ``mixtral_jax.generate`` is a
client of this engine: it submits all its prompts at once and steps the loop until they finish.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.inference.logprobs import MAX_TOP_LOGPROBS, token_logprobs
from mixtral_jax.inference.pages import PAGE_SIZE, Sequence, pages_for_budget
from mixtral_jax.inference.paged_runner import PagedRunner
from mixtral_jax.inference.placement import decode_views, mesh_context, place, resolve_mesh
from mixtral_jax.inference.paged_engine import PagedSteps
from mixtral_jax.inference.programs import CHUNK_SECONDS, MAX_CHUNK, bucket, decode_program, prefill_program
from mixtral_jax.inference.requests import Metrics, QueueFull, Request
from mixtral_jax.inference.row import Row
from mixtral_jax.model import init_cache
from mixtral_jax.sampling import RowSettings, sample_rows


@dataclasses.dataclass
class _Chunk:
  """A dispatched decode chunk: its tokens (device arrays: step j in row j of ``out_CB``, the last ones
  ``last_B``), the request of each row it decoded (None: inactive), its steps, its dispatch time."""
  out_CB: jax.Array
  last_B: jax.Array
  reqs: list
  n: int
  t: float


class Engine(PagedSteps):
  """The continuous-batching loop over one model (see the module docstring). ``submit`` from any
  thread; ``start``/``stop`` the loop thread. The paged loop's methods (``_paged_*``) come from
  :class:`~mixtral_jax.inference.paged_engine.PagedSteps`."""

  def __init__(self, model, tokenizer=None, *, max_batch: int = 16, max_context: int | None = None,
               max_queue: int = 64, prefill_chunk: int = 256, mesh=None,
               decode_views_wanted: bool = True, kv_cache_gib: float | None = None, page_size: int = PAGE_SIZE,
               prefix_caching: bool = True, adapters: tuple[str, ...] = ()):
    cfg = model.cfg
    self.cfg, self.tokenizer = cfg, tokenizer
    self.max_context = int(max_context or cfg.max_position_embeddings)
    if not 1 <= self.max_context <= cfg.max_position_embeddings:
      raise ValueError(f"--max-context {self.max_context} must be in [1, {cfg.max_position_embeddings}] "
                       "(the model's max_position_embeddings)")
    if max_batch < 1 or max_queue < 0:
      raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
    self.mesh = resolve_mesh(mesh, cfg)
    self.B, self.max_queue = int(max_batch), int(max_queue)
    self.prefill_chunk = bucket(prefill_chunk)
    self.graphdef, self.state = nnx.split(model)
    if self.mesh is not None:
      self.state = place(self.state, self.mesh)
    self.layers = decode_views(model, self.mesh) if decode_views_wanted else None
    self.runner: PagedRunner | None = None  # the paged cache (--kv-cache-gib), else fixed rows
    self.cache = None
    self.adapters = tuple(adapters)  # a served bank's names (model with lora.bank adapters), slot i + 1
    if self.adapters and kv_cache_gib is None:
      raise ValueError("serving adapters needs the paged KV cache: pass the Engine's kv_cache_gib "
                       "(serve pages by default; serve --fixed-rows has no adapters)")
    with mesh_context(self.mesh):
      if kv_cache_gib is None:
        self.cache = init_cache(cfg, self.B, self.max_context)
      else:
        num_pages = pages_for_budget(kv_cache_gib, num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                     head_dim=cfg.head_size, dtype_bytes=jnp.dtype(cfg.dtype).itemsize,
                                     max_context=self.max_context, page_size=page_size)
        self.runner = PagedRunner(self.graphdef, self.state, cfg, num_pages=num_pages, max_batch=self.B,
                                  max_context=self.max_context, prefill_chunk=self.prefill_chunk, page_size=page_size,
                                  prefix_caching=prefix_caching, layers=self.layers, adapters=self.adapters)
    self.running: list[Request] = []  # paged: admitted requests, oldest first
    self.seqs: dict[int, Sequence] = {}  # paged: request id -> its pages
    self._sample = jax.jit(sample_rows)
    self._structured = None
    self._logprobs = jax.jit(functools.partial(token_logprobs, k=MAX_TOP_LOGPROBS))
    self._prefill, self._decode = prefill_program(self.graphdef), decode_program(self.graphdef)
    self._chunk = 1  # decode steps per call, adapted to CHUNK_SECONDS
    self._flight: _Chunk | None = None  # the decode chunk dispatched and not yet read back
    self._last_read = 0.0  # when the last chunk was read back (perf_counter)
    B = self.B
    self.slots: list[Request | None] = [None] * B
    self.prefilled = [0] * B  # prompt tokens of the row's request already in the cache
    self.tokens = np.zeros(B, np.int32)
    self.positions = np.zeros(B, np.int32)
    self.steps = np.zeros(B, np.int32)
    self.decoding = np.zeros(B, bool)
    self.waiting: collections.deque[Request] = collections.deque()
    self.metrics = Metrics()
    self.timing = collections.Counter()  # paged: prefill/decode calls, tokens, seconds (benchmarks)
    self._wake = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopped = False

  # ------------------------------------------------------------------------------ public

  def submit(self, req: Request) -> None:
    """Queues a request (raises :class:`QueueFull` when ``max_queue`` wait already, ValueError when it
    cannot fit the context)."""
    n = len(req.prompt)
    if (req.top_logprobs is not None or req.grammar is not None) and self.runner is None:
      raise ValueError("logprobs and response_format need the paged KV cache: pass the Engine's kv_cache_gib "
                       "(serve pages by default; serve --fixed-rows has neither)")
    if req.adapter is not None and req.adapter not in self.adapters:
      raise ValueError(f"no adapter {req.adapter!r} is served (served: {', '.join(self.adapters) or 'none'})")
    if req.grammar is not None:
      req.matcher = self.structured().matcher(req.grammar)
    if n + req.max_tokens > self.max_context:
      raise ValueError(f"the prompt has {n} tokens and max_tokens is {req.max_tokens}, {n + req.max_tokens} in "
                       f"all, but the context is {self.max_context} tokens")
    with self._wake:
      # rows the waiting requests will take at the next step (the paged loop leaves ``slots`` empty)
      free = self.B - len(self.running) if self.runner is not None else sum(r is None for r in self.slots)
      if len(self.waiting) >= self.max_queue + free:
        self.metrics.rejected += 1
        raise QueueFull(f"all {self.B} rows are busy and {self.max_queue} requests are waiting (--max-queue); "
                        "retry later")
      req.row = Row(0, self.tokenizer, req.eos, req.stop, self._streamer(req))
      self.waiting.append(req)
      self._wake.notify()

  def queue_depth(self) -> int:
    return len(self.waiting)  # just-arrived requests count until the next step gives them a row

  def busy_rows(self) -> int:
    return sum(r is not None for r in self.slots) + len(self.running)

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._loop, name="mixtral-jax-engine", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    with self._wake:
      self._stopped = True
      self._wake.notify()
    if self._thread is not None:
      self._thread.join(timeout=30)

  def warmup(self, prompt_lengths=(1,)) -> None:
    """Compiles the prefill chunk shapes needed by prompts of these lengths, the decode step, and the
    prefill of every row count and chunk width a server meets (paged: every (R, C) step shape of
    :meth:`PagedRunner.warmup`, and the sampler at every batch size)."""
    for n in prompt_lengths:
      done = threading.Event()
      self.submit(Request([self.cfg.bos_token_id] * n, 2, lambda *_: None, lambda *_: done.set()))
      if self._thread is None:
        while not done.is_set():
          self.step()
      else:
        done.wait()
    if self.runner is not None:  # every compiled decode batch size, and the sampler at each
      with mesh_context(self.mesh):
        self.runner.warmup(lambda R: self._settings([None] * R))
        for R in self.runner.sizes:
          self._sample(jnp.zeros((R, self.cfg.vocab_size), jnp.float32), self._settings([None] * R),
                       np.zeros(R, np.int32))
    else:  # the prefill of every row count (1, 2, 4, ... cut out; B in place), every chunk width, writing nothing
      with mesh_context(self.mesh):
        for R in sorted({min(1 << i, self.B) for i in range(self.B.bit_length() + 1)}):
          C = 16
          while C <= min(self.prefill_chunk, bucket(self.max_context, 16)):
            zeros = np.zeros((R, C), np.int32)
            rows_R = np.arange(R, dtype=np.int32) if R < self.B else None
            _, self.cache = self._prefill(self.state, zeros, zeros, zeros.astype(bool), self.cache, rows_R,
                                          np.zeros(R, bool), np.zeros(R, np.int32), self._settings([None] * R),
                                          self.layers)
            C *= 2
    self.metrics, self.timing = Metrics(), collections.Counter()

  # ------------------------------------------------------------------------------ the loop

  def _loop(self) -> None:
    while True:
      with self._wake:
        while not self._stopped and not self.waiting and not self.busy_rows():
          self._wake.wait()
        if self._stopped:
          return
      try:
        self.step()
      except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
        traceback.print_exc()
        self._fail_all(f"{type(e).__name__}: {e}")

  def step(self) -> None:
    """One iteration of the loop (see the module docstring)."""
    if self.runner is not None:
      self._paged_step()
      return
    self._drop_cancelled()
    self._admit()
    with mesh_context(self.mesh):
      prefilling = [b for b, req in enumerate(self.slots) if req is not None and not self.decoding[b]]
      if prefilling:
        self._drain()  # the rows joining decode take their first token from the host
        self._prefill_rows(prefilling)
      if self.decoding.any():
        self._decode_steps()

  def run_until_done(self) -> None:
    """Steps the loop on this thread until no request waits or runs (``generate``'s use)."""
    while self.waiting or self.busy_rows():
      self.step()

  def _drop_cancelled(self) -> None:
    with self._wake:
      for req in [r for r in self.waiting if r.cancelled]:
        self.waiting.remove(req)
        self._finish(req, "cancelled")
    for b, req in enumerate(self.slots):
      if req is not None and req.cancelled:
        self._free(b, "cancelled")

  def _admit(self) -> None:
    with self._wake:
      for b in range(self.B):
        if self.slots[b] is None and self.waiting:
          self.slots[b], self.prefilled[b], self.decoding[b] = self.waiting.popleft(), 0, False

  def _settings(self, reqs) -> RowSettings:
    return RowSettings.of([(r.temperature, r.top_k, r.top_p, r.seed, r.index) if r else (0.0, 0, 1.0, 0, 0)
                           for r in reqs])

  def _prefill_order(self, rows: list[int]) -> list[int]:
    """The cache rows one prefill call runs for the prefilling ``rows``: R = their count rounded up to a
    power of two; all B rows in place when R reaches B, else ``rows`` and R - len(rows) other rows,
    cut out of the cache and written back (distinct rows, so none is written back twice; the others pass
    no valid column, so they come back as they were). Why not always all B in place: a prefill costs
    its rows times its columns, and 2 of 16 rows joining would pay for 16."""
    R = bucket(len(rows))
    if R >= self.B:
      return list(range(self.B))
    return list(rows) + [b for b in range(self.B) if b not in rows][:R - len(rows)]

  def _prefill_rows(self, rows: list[int]) -> None:
    """The next prompt chunk of each row in ``rows`` in one prefill call over the rows of
    :meth:`_prefill_order`, the others masked out."""
    chunks = {b: self.slots[b].prompt[self.prefilled[b]:self.prefilled[b] + self.prefill_chunk] for b in rows}
    C = min(bucket(max(map(len, chunks.values())), 16), self.prefill_chunk)
    order = self._prefill_order(rows)
    R = len(order)
    ids, valid = np.zeros((R, C), np.int32), np.zeros((R, C), bool)
    positions, reset, last = np.zeros((R, C), np.int32), np.zeros(R, bool), np.zeros(R, np.int32)
    for r, b in enumerate(order):
      if b in chunks:
        n, start = len(chunks[b]), self.prefilled[b]
        ids[r, :n], valid[r, :n], positions[r] = chunks[b], True, start + np.arange(C)
        reset[r], last[r] = start == 0, n - 1
    reqs = [self.slots[b] if b in chunks else None for b in order]
    rows_R = np.asarray(order, np.int32) if R < self.B else None
    tokens, self.cache = self._prefill(self.state, ids, positions, valid, self.cache, rows_R, reset, last,
                                       self._settings(reqs), self.layers)
    tokens = np.asarray(tokens)
    for r, b in enumerate(order):
      if b in chunks:
        self.prefilled[b] += len(chunks[b])
        if self.prefilled[b] == len(self.slots[b].prompt):
          self._start_decoding(b, int(tokens[r]))

  def _start_decoding(self, b: int, token: int) -> None:
    req = self.slots[b]
    self.metrics.prompt_tokens += len(req.prompt)
    self.tokens[b], self.positions[b], self.steps[b], self.decoding[b] = token, len(req.prompt), 1, True
    self._push(b, req, token)

  def _busy(self) -> bool:
    """Whether a request waits or a row still prefills: then decode runs one step per call, read at
    once, so that new requests join at the next step."""
    return bool(self.waiting) or any(r is not None and not self.decoding[b] for b, r in enumerate(self.slots))

  def _decode_steps(self) -> None:
    """Decode: while busy, one step, read back at once. Else chunk c+1 is dispatched before chunk c is
    read back (its input tokens are chunk c's last tokens, still on the device), so the device works
    while the host does chunk c's bookkeeping; rows that finish inside chunk c decode on in chunk c+1
    and those tokens are dropped (each row's tokens depend only on its own history)."""
    if self._busy():
      self._drain()
      self._read(self._dispatch(1))
      return
    nxt = self._dispatch(self._chunk)
    self._drain()
    self._flight = nxt

  def _dispatch(self, most: int) -> "_Chunk | None":
    """Starts the next decode chunk of every decoding row with tokens left to produce (counting those
    already dispatched), at most ``most`` steps and no more than the fewest any of them has left.
    Positions and step counts advance here; the tokens come back through :meth:`_read`."""
    budget_B = np.array([r.max_tokens if r is not None else 0 for r in self.slots], np.int32)
    active_B = self.decoding & (self.steps < budget_B)
    if not active_B.any():
      return None
    n = max(1, min(most, int((budget_B - self.steps)[active_B].min())))
    tokens_B = self.tokens if self._flight is None else self._flight.last_B  # the device's, unread
    reqs = [r if active_B[b] else None for b, r in enumerate(self.slots)]
    out_CB, last_B, self.cache = self._decode(self.state, tokens_B, self.positions, self.cache, active_B,
                                              self._settings(reqs), self.steps, n, self.layers)
    self.positions = np.where(active_B, self.positions + n, self.positions).astype(np.int32)
    self.steps = np.where(active_B, self.steps + n, self.steps).astype(np.int32)
    return _Chunk(out_CB, last_B, reqs, n, time.perf_counter())

  def _drain(self) -> None:
    """Reads back the chunk in flight, if any."""
    chunk, self._flight = self._flight, None
    if chunk is not None:
      self._read(chunk)

  def _read(self, chunk: "_Chunk | None") -> None:
    """Passes a chunk's tokens to the rows that still serve the request they had at its dispatch (a
    row freed in between, finished or cancelled, drops them), and sizes the next chunk to about
    CHUNK_SECONDS of device time from this chunk's: from its dispatch, or from the last read when it
    was dispatched before that (then it ran while the host worked)."""
    if chunk is None:
      return
    out_CB = np.asarray(chunk.out_CB)
    now = time.perf_counter()
    live = [b for b, req in enumerate(chunk.reqs) if req is not None and self.slots[b] is req]
    if live:
      self._chunk = max(1, min(MAX_CHUNK, int(CHUNK_SECONDS * chunk.n / max(now - max(chunk.t, self._last_read), 1e-6))))
      self.metrics.decode_steps += chunk.n
      self.metrics.occupied_row_steps += chunk.n * len(live)
    self._last_read = now
    for b in live:
      req = chunk.reqs[b]
      self.tokens[b] = out_CB[chunk.n - 1, b]
      for j in range(chunk.n):
        if self.slots[b] is not req:  # finished at an earlier step of this chunk
          break
        self._push(b, req, int(out_CB[j, b]))

  # ------------------------------------------------------------------------------ bookkeeping

  def _push(self, b: int, req: Request, token: int) -> None:
    row = req.row
    row.push(token, is_last_step=len(row.tokens) + 1 >= req.max_tokens)
    if row.finish is not None:
      self._free(b, row.finish)

  def _streamer(self, req: Request):
    def stream(_index, token, delta):
      if req.first_token_at is None:
        req.first_token_at = time.perf_counter()
        self.metrics.ttft.append(req.first_token_at - req.submitted)
      req.on_token(token, delta)
    return stream

  def _free(self, b: int, reason: str) -> None:
    req = self.slots[b]
    self.slots[b], self.decoding[b] = None, False
    self._finish(req, reason)

  def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
    self.metrics.requests += 1
    self.metrics.generated_tokens += len(req.row.tokens) if req.row else 0
    try:
      req.on_done(reason, error)
    except Exception:  # noqa: BLE001 - a broken callback must not stop the loop
      traceback.print_exc()

  def _fail_all(self, error: str) -> None:
    self._flight = None
    for req in list(self.running):
      self.runner.release(self.seqs.pop(req.id))
      self.running.remove(req)
      self._finish(req, "error", error)
    for b, req in enumerate(self.slots):
      if req is not None:
        self.slots[b], self.decoding[b] = None, False
        self._finish(req, "error", error)
