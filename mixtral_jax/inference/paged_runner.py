"""The paged KV cache of one model on device plus its host bookkeeping: what the engine asks of it.

``PagedRunner`` owns the device pools ``[L, P, p, K, H]`` (keys and values), the host
:class:`~mixtral_jax.inference.pages.PagePool`, and the compiled paged step
(:mod:`mixtral_jax.inference.paged_programs`). The engine keeps its requests, sampling and streaming,
and calls:

  * ``admit(id, tokens, adapter)``: a :class:`Sequence` holding pages for the prompt (its longest cached
    prefix reused), or None when the pool cannot take it now (the request keeps waiting);
  * ``prefill_many(seqs, wide)``: the next chunk of uncached tokens of the first k of ``seqs`` (oldest
    first) in one device call, at most ``prefill_chunk`` tokens in all, padding included, or with
    ``wide`` (few requests decode) up to every row of ``prefill_chunk`` columns
    (:func:`~mixtral_jax.inference.paged_batch.plan_prefill`); returns those k and the logits ``[R, V]``
    of each row's last token (row r's matter once seqs[r] is wholly in the cache; device arrays, not
    waited for); ``prefill(seq)`` is the one-sequence case (the logits ``[V]``, or None);
  * ``append(seq, token)`` after sampling; then ``ensure_room(seqs)`` before a decode step (returns
    the sequences preempted for lack of pages: released, to be admitted again with their tokens);
  * ``decode(seqs)``: one step of these sequences compacted into the first rows of the next compiled
    batch size R; logits ``[R, V]`` (rows past len(seqs) are padding);
  * ``decode_steps(seqs, settings, steps_R, n)``: up to ``room(seqs)`` decode steps in one device call,
    sampling on device (no grammar masks or logprobs between steps); the tokens ``[n, len(seqs)]``,
    appended to the sequences;
  * ``release(seq)`` when a request ends.

``layers`` (the single-CPU-device per-layer weight views, :func:`mixtral_jax.model.layer_views`) serve
decode steps, as in the engine's contiguous-cache decode, and prefill steps of at most ``moe_block``
tokens (R * C, padding included: every expert then runs over those tokens with its weights read in
place, ``mixtral_jax.moe``); larger prefill steps run the scanned stack.

Adapters: with ``adapters`` (the names of a served bank, ``mixtral_jax.lora.bank``, slot i + 1 for
name i), each row of a step carries its sequence's adapter slot (0: the base), so one decode step mixes
rows of different adapters, and so does a prefill step. A sequence's adapter is
also part of its pages' prefix keys (:func:`~mixtral_jax.inference.pages.page_key`): pages computed under
one adapter are never reused under another.

Memory: ``num_pages`` from ``--kv-cache-gib`` (:func:`~mixtral_jax.inference.pages.pages_for_budget`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.attn.paged import PagedKVCache, init_pools
from mixtral_jax.inference.paged_batch import (MIN_COLUMNS, StepArrays, compiled_sizes, decode_arrays, plan_prefill,
                                               prefill_batch_arrays, prefill_shapes)
from mixtral_jax.inference.paged_programs import MAX_STEPS, paged_decode_program, paged_step_program
from mixtral_jax.inference.pages import PAGE_SIZE, PagePool, Sequence


class PagedRunner:
  """See the module docstring. Not thread-safe: the engine's loop thread owns it."""

  def __init__(self, graphdef, state, cfg, *, num_pages: int, max_batch: int, max_context: int,
               prefill_chunk: int = 256, page_size: int = PAGE_SIZE, prefix_caching: bool = True, layers=None,
               dtype=None, adapters: tuple[str, ...] = ()):
    self.graphdef, self.state, self.layers = graphdef, state, layers
    self.adapters = tuple(adapters)
    self.pool = PagePool(num_pages, page_size, prefix_caching=prefix_caching)
    self.width = -(-max_context // page_size)
    if self.width + 1 > num_pages:
      raise ValueError(f"{num_pages} pages of {page_size} tokens cannot hold one --max-context {max_context} "
                       f"request ({self.width} pages plus the null page); raise --kv-cache-gib or lower --max-context")
    self.sizes = compiled_sizes(max_batch)
    self.prefill_chunk = max(int(prefill_chunk), MIN_COLUMNS)  # tokens per prefill step, padding included
    self.prefill_shapes = prefill_shapes(self.prefill_chunk, self.sizes, 1 << (max(max_context, MIN_COLUMNS) - 1).bit_length())
    self.moe_block = cfg.moe_block
    self.k, self.v = init_pools(cfg.num_hidden_layers, num_pages, page_size, cfg.num_key_value_heads,
                                cfg.head_size, jnp.dtype(dtype or cfg.dtype))
    self._run = paged_step_program(graphdef)
    self._run_steps = paged_decode_program(graphdef)

  # ------------------------------------------------------------------ sequences

  def admit(self, seq_id: int, tokens: list[int], adapter: str | None = None) -> Sequence | None:
    if adapter is not None and adapter not in self.adapters:
      raise ValueError(f"no adapter {adapter!r} is served (served: {', '.join(self.adapters) or 'none'})")
    return self.pool.admit(seq_id, tokens, adapter)

  def prefill(self, seq: Sequence) -> jax.Array | None:
    """The next chunk of ``seq`` alone; the logits ``[V]`` of its last token once it is wholly in the
    cache, else None."""
    _, logits_RV = self.prefill_many([seq])
    return logits_RV[0] if seq.computed == len(seq.tokens) else None

  def prefill_many(self, seqs: list[Sequence], wide: bool = False) -> tuple[list[Sequence], jax.Array]:
    """One prefill step over the first k of ``seqs`` (see the module docstring): (those k, logits
    ``[R, V]``, row r at seqs[r]'s last computed token). ``wide``: few requests decode (the engine's
    rule), so the step may take the wide budget."""
    k, C = plan_prefill(seqs, self.prefill_chunk, self.sizes, wide)
    a = prefill_batch_arrays(self.pool, seqs[:k], C, self.width, self.sizes)
    logits_RV = self._step(a, self._prefill_layers(a))
    for seq, n in zip(a.seqs, a.kv_len_R.tolist()):
      self.pool.mark_computed(seq, n)
    return a.seqs, logits_RV

  def _prefill_layers(self, a: StepArrays):
    """The weight views for a prefill step of at most ``moe_block`` tokens (padding included), else None
    (the scanned stack): the views' MoE runs every expert over every token."""
    return self.layers if a.ids_RC.size <= self.moe_block else None

  def append(self, seq: Sequence, token: int) -> None:
    self.pool.append(seq, token)

  def ensure_room(self, seqs: list[Sequence]) -> list[Sequence]:
    return self.pool.ensure_room(seqs)

  def decode(self, seqs: list[Sequence]) -> jax.Array:
    """Logits ``[R, V]`` of the compiled batch size R >= len(seqs): row r < len(seqs) is seqs[r]'s,
    the rest padding (kept, so the sampler too sees only compiled sizes)."""
    a = decode_arrays(self.pool, seqs, self.width, self.sizes)
    logits = self._step(a, self.layers)
    for seq in seqs:
      self.pool.mark_computed(seq, len(seq.tokens))
    return logits

  def room(self, seqs: list[Sequence]) -> int:
    """Decode steps every one of ``seqs`` can take in the pages it holds now (at most MAX_STEPS): step j
    writes position len(tokens) - 1 + j, which must lie inside the sequence's pages."""
    P = self.pool.page_size
    return max(0, min([MAX_STEPS] + [len(s.pages) * P - len(s.tokens) + 1 for s in seqs]))

  def decode_steps(self, seqs: list[Sequence], settings_of, steps: list[int], n: int) -> np.ndarray:
    """``n`` (1 <= n <= room(seqs)) decode steps of ``seqs`` in one device call, compacted and padded as
    :meth:`decode`; row r samples with ``settings_of(R)`` (the RowSettings of the R padded rows) at step
    ``steps[r] + j``. Returns the tokens ``[n, len(seqs)]``, each already appended to its sequence."""
    if not 1 <= n <= self.room(seqs):
      raise ValueError(f"{n} decode steps do not fit the sequences' pages (room for {self.room(seqs)}); "
                       "call ensure_room and take at most room(seqs) steps")
    a = decode_arrays(self.pool, seqs, self.width, self.sizes)
    R = a.ids_RC.shape[0]
    steps_R = np.asarray(list(steps) + [0] * (R - len(seqs)), np.int32)
    cache = PagedKVCache(self.k, self.v, jnp.asarray(a.table_RM), jnp.asarray(a.kv_len_R))
    out_SR, cache = self._run_steps(self.state, a.ids_RC[:, 0], a.positions_RC[:, 0], cache, settings_of(R),
                                    steps_R, np.int32(n), self.layers, self._adapter_rows(a))
    self.k, self.v = cache.k, cache.v
    out_nS = np.asarray(out_SR)[:n, :len(seqs)]
    for r, seq in enumerate(seqs):
      for token in out_nS[:, r].tolist():
        self.pool.append(seq, token)
      self.pool.mark_computed(seq, len(seq.tokens) - 1)  # the last sampled token is fed by the next step
    return out_nS

  def release(self, seq: Sequence) -> None:
    self.pool.release(seq)

  # ------------------------------------------------------------------ device

  def _adapter_rows(self, a: StepArrays):
    """int32 [R]: each row's adapter slot (padding rows: the base), or None without served adapters."""
    if not self.adapters:
      return None
    slots = [0 if s.adapter is None else self.adapters.index(s.adapter) + 1 for s in a.seqs]
    return np.asarray(slots + [0] * (a.ids_RC.shape[0] - len(slots)), np.int32)

  def _step(self, a: StepArrays, layers) -> jax.Array:
    cache = PagedKVCache(self.k, self.v, jnp.asarray(a.table_RM), jnp.asarray(a.kv_len_R))
    logits, cache = self._run(self.state, a.ids_RC, a.positions_RC, a.valid_RC, cache, a.last_R, layers,
                              self._adapter_rows(a))
    self.k, self.v = cache.k, cache.v
    return logits  # not waited for: the caller prepares sampling (grammar masks) while it runs

  def warmup(self, settings_of=None) -> None:
    """Compiles every prefill step shape and the decode step for every compiled batch size (padding rows
    only: nothing is written), and with ``settings_of`` (R -> RowSettings of R idle rows) the multi-step
    decode too."""
    for R, C in self.prefill_shapes:
      a = prefill_batch_arrays(self.pool, [], C, self.width, (R,))
      self._step(a, self._prefill_layers(a))
    for R in self.sizes:
      a = decode_arrays(self.pool, [], self.width, (R,))
      self._step(a, self.layers)
      if settings_of is not None:
        cache = PagedKVCache(self.k, self.v, jnp.asarray(a.table_RM), jnp.asarray(a.kv_len_R))
        _, cache = self._run_steps(self.state, a.ids_RC[:, 0], a.positions_RC[:, 0], cache, settings_of(R),
                                   np.zeros(R, np.int32), np.int32(1), self.layers, self._adapter_rows(a))
        self.k, self.v = cache.k, cache.v
