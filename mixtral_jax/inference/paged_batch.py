"""The arrays of one paged device step, built on the host from the sequences that take part.

Decode runs only the rows in use: the n decoding sequences are packed into the first n rows, padded to
the next compiled batch size (1, 2, 4, 8, ... up to ``max_batch``, as vLLM pads to its CUDA-graph
sizes), so one client on a 16-row server runs a batch of 1 and few shapes ever compile. Padding rows
have ``valid`` False, a table of null pages, ``kv_len`` 0 and position -1: they write only into the null
page and read nothing (:mod:`mixtral_jax.attn.paged`).

Prefill runs one sequence's next chunk: at most ``chunk`` of its tokens not yet in the cache (after a
prefix-cache hit, the chunk starts at the first uncached token), right-padded to a power of two >= 16.

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


def prefill_arrays(pool: PagePool, seq: Sequence, chunk: int, width: int) -> StepArrays:
  """The next prompt chunk of ``seq``: tokens ``computed .. computed + n`` (n <= chunk), padded to a
  power of two >= 16 columns. ``last`` is the chunk's final real column (its logits matter only when
  the chunk ends the known tokens)."""
  start = seq.computed
  n = min(chunk, len(seq.tokens) - start)
  if n <= 0:
    raise ValueError(f"sequence {seq.id} has no tokens left to prefill ({seq.computed} of {len(seq.tokens)})")
  C = 1 << (max(n, 16) - 1).bit_length()
  ids = np.zeros((1, C), np.int32)
  ids[0, :n] = seq.tokens[start:start + n]
  pos = np.full((1, C), -1, np.int32)
  pos[0, :n] = np.arange(start, start + n)
  table = pool.page_table([seq], width)
  return StepArrays([seq], ids, pos, pos >= 0, table, np.array([start + n], np.int32), np.array([n - 1], np.int32))
