"""The arrays of one paged device step, built on the host from the sequences that take part.

Decode runs only the rows in use: the n decoding sequences are packed into the first n rows, padded to
the next compiled batch size (1, 2, 4, 8, ... up to ``max_batch``, as vLLM pads to its CUDA-graph
sizes), so one client on a 16-row server runs a batch of 1 and few shapes ever compile. Padding rows
have ``valid`` False, a table of null pages, ``kv_len`` 0 and position -1: they write only into the null
page and read nothing (:mod:`mixtral_jax.attn.paged`).

Prefill runs the next chunk of several sequences in one step (:func:`plan_prefill`,
:func:`prefill_batch_arrays`): row r holds at most C of sequence r's tokens not yet in the cache (after
a prefix-cache hit, the chunk starts at the first uncached token), right-padded to C columns; R is a
compiled batch size and C a power of two >= 16 with R * C <= the token budget (``prefill_chunk``), so a
step costs at most a budget of tokens and only :func:`prefill_shapes` ever compile. The plan takes the
oldest sequences first and as many as give the most real tokens under the budget: one 2k prompt takes
the whole budget alone, sixteen 10-token prompts share one 16 x 16 step.

Two budgets: the token budget ``prefill_chunk`` bounds how long a prefill step stalls the requests that
decode. When they are few (the engine's rule: no more of them than requests prefilling), the step may
take up to ``max_batch`` rows of at most ``prefill_chunk`` columns each (:func:`wide_budget`): a burst
of sixteen arrivals is prefilled in one call, as ``generate`` prefills its batch, rather than in six
calls of 256 tokens with decode steps of the first arrivals in between (measured on ``bench-small``,
CPU: 1.0 s against 1.4 s of prefill for the same 1,034 tokens, and 26 against 34 decode calls after
it, since the rows then decode in lockstep).

For both, ``kv_len`` is the row's filled length *after* this step's writes (the step writes first, then
attends), and the page table is ``width`` = max_context / page_size entries wide.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixtral_jax.inference.pages import PagePool, Sequence


def compiled_sizes(max_batch: int) -> tuple[int, ...]:
  """Batch sizes the decode program is compiled for: powers of two below ``max_batch``, and it."""
  sizes, n = [], 1
  while n < max_batch:
    sizes.append(n)
    n *= 2
  return tuple(sizes + [max_batch])


def padded_size(n: int, sizes: tuple[int, ...]) -> int:
  """The smallest compiled size that holds ``n`` rows."""
  for s in sizes:
    if s >= n:
      return s
  raise ValueError(f"{n} rows exceed the largest compiled batch {sizes[-1]}; admit at most max_batch sequences")


@dataclasses.dataclass
class StepArrays:
  """Device inputs of one step over R rows (R: a compiled size) and C columns."""
  seqs: list[Sequence]  # the live rows, in row order (rows past len(seqs) are padding)
  ids_RC: np.ndarray  # int32
  positions_RC: np.ndarray  # int32, -1 for padding
  valid_RC: np.ndarray  # bool
  table_RM: np.ndarray  # int32, null-page padded
  kv_len_R: np.ndarray  # int32, after this step's writes
  last_R: np.ndarray  # int32: the column whose logits give each row's next token


def decode_arrays(pool: PagePool, seqs: list[Sequence], width: int, sizes: tuple[int, ...]) -> StepArrays:
  """One decode step of ``seqs`` (each feeds its last token, at position len(tokens) - 1), compacted
  into the first rows of the next compiled size."""
  R = padded_size(len(seqs), sizes)
  ids = np.zeros((R, 1), np.int32)
  pos = np.full((R, 1), -1, np.int32)
  kv_len = np.zeros(R, np.int32)
  for r, seq in enumerate(seqs):
    if not pool.has_room(seq):
      raise ValueError(f"sequence {seq.id} has no page for its next token; call PagePool.ensure_room first")
    ids[r, 0], pos[r, 0], kv_len[r] = seq.tokens[-1], len(seq.tokens) - 1, len(seq.tokens)
  table = pool.page_table(list(seqs) + [None] * (R - len(seqs)), width)
  return StepArrays(list(seqs), ids, pos, pos >= 0, table, kv_len, np.zeros(R, np.int32))


MIN_COLUMNS = 16  # the narrowest prefill chunk: fewer shapes, and a 16-wide matmul is no slower on CPU


def _pow2_at_least(n: int) -> int:
  return 1 << (max(n, MIN_COLUMNS) - 1).bit_length()


def _pow2_at_most(n: int) -> int:
  return 1 << (n.bit_length() - 1)


def _wide_columns(budget: int) -> int:
  """The most columns a row of a wide prefill step takes: the busy budget's, as a power of two."""
  return _pow2_at_most(max(budget, MIN_COLUMNS))


def wide_budget(budget: int, sizes: tuple[int, ...]) -> int:
  """The token budget of a wide prefill step: every row (``sizes[-1]``, the largest compiled batch)
  with at most the busy ``budget``'s columns (see the module docstring)."""
  return sizes[-1] * _wide_columns(budget)


def prefill_shapes(budget: int, sizes: tuple[int, ...], max_columns: int) -> list[tuple[int, int]]:
  """Every (R, C) a prefill step may take (what ``warmup`` compiles): R a compiled size, C a power of
  two from MIN_COLUMNS up to ``max_columns``, with R * C <= ``budget`` (a busy step), or with
  C <= ``budget`` and R * C <= :func:`wide_budget` (a wide one)."""
  shapes = []
  for R in sizes:
    C = MIN_COLUMNS
    while C <= max_columns and (R * C <= budget or C <= budget and R * C <= wide_budget(budget, sizes)):
      shapes.append((R, C))
      C *= 2
  return shapes


def plan_prefill(seqs: list[Sequence], budget: int, sizes: tuple[int, ...], wide: bool = False) -> tuple[int, int]:
  """(k, C): the next prefill step runs the first k of ``seqs`` (oldest first) with C columns each, the
  k and C whose real tokens (sum of min(tokens left, C)) are the most under R * C <= ``budget``
  (R = k padded to a compiled size); ties go to fewer rows. ``wide``: under :func:`wide_budget`
  instead, with C <= ``budget``."""
  tokens, columns = (wide_budget(budget, sizes), _wide_columns(budget)) if wide else (budget, budget)
  best = (0, 1, MIN_COLUMNS)
  for k in range(1, len(seqs) + 1):
    if k > sizes[-1] or padded_size(k, sizes) * MIN_COLUMNS > tokens:
      break
    left = [len(s.tokens) - s.computed for s in seqs[:k]]
    C = min(_pow2_at_least(max(left)), _pow2_at_most(min(columns, tokens // padded_size(k, sizes))))
    real = sum(min(n, C) for n in left)
    if real > best[0]:
      best = (real, k, C)
  return best[1], best[2]


def prefill_batch_arrays(pool: PagePool, seqs: list[Sequence], columns: int, width: int,
                         sizes: tuple[int, ...]) -> StepArrays:
  """The next chunk of each of ``seqs``: row r takes tokens ``computed .. computed + n_r`` of seqs[r]
  (n_r <= ``columns``), right-padded to ``columns``; rows past len(seqs) up to the compiled size are
  padding. ``last`` is each chunk's final real column (its logits matter only when the chunk ends the
  known tokens)."""
  R = padded_size(len(seqs), sizes)
  ids = np.zeros((R, columns), np.int32)
  pos = np.full((R, columns), -1, np.int32)
  kv_len, last = np.zeros(R, np.int32), np.zeros(R, np.int32)
  for r, seq in enumerate(seqs):
    start = seq.computed
    n = min(columns, len(seq.tokens) - start)
    if n <= 0:
      raise ValueError(f"sequence {seq.id} has no tokens left to prefill ({seq.computed} of {len(seq.tokens)})")
    ids[r, :n] = seq.tokens[start:start + n]
    pos[r, :n] = np.arange(start, start + n)
    kv_len[r], last[r] = start + n, n - 1
  table = pool.page_table(list(seqs) + [None] * (R - len(seqs)), width)
  return StepArrays(list(seqs), ids, pos, pos >= 0, table, kv_len, last)


def prefill_arrays(pool: PagePool, seq: Sequence, chunk: int, width: int) -> StepArrays:
  """The next prompt chunk of ``seq`` alone: at most ``chunk`` tokens, padded to a power of two >= 16
  columns (:func:`prefill_batch_arrays` with one row)."""
  n = len(seq.tokens) - seq.computed
  return prefill_batch_arrays(pool, [seq], _pow2_at_least(min(chunk, max(n, 1))), width, (1,))
