"""Preference pairs (DPO) as token shards: written by ``mixtral-jax tokenize --preference``, streamed by
training like pretraining rows.

A preference shard (kind ``preference`` in the manifest; the shard format of ``shards.py``) holds::

  <split>-<n>.tokens    every pair's prompt, chosen answer and rejected answer ids, back to back
  <split>-<n>.docs      int64 offset of every pair's first token
  <split>-<n>.lens      int32 [pairs, 3]: the prompt, chosen and rejected lengths
  <split>-<n>.heldout   uint8 per pair: 1 when the pair is held out
  <split>-<n>.where     uint64 byte offset of every pair's JSONL line, for errors that name file:line

The held-out split is by *pair*, not by file (a preference set is often one file): a CRC of the file's
base name and the line's byte offset, below ``heldout_fraction`` of 10,000, holds a pair out - the rule
the in-memory reader (``preference.PairRows`` over ``preference_pairs``) used, so both give the same
rows in the same order. Every shard is listed under both splits of the manifest; a reader keeps the
pairs whose flag matches its split. Pairs are encoded by ``preference.encode_pair`` (mistral-common's
instruct template); a bad line stops the run with file:line before its shard is written, and the
manifest is written only when every shard is complete.

Only four small integers per pair are held in memory; a pair's tokens are read when its row is asked for.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from . import shards as shards_lib
from .preference import Pair, pair_rows_fields, preference_pairs

PER_10K = 10_000


def is_heldout_pair(path: str, offset: int, fraction: float) -> bool:
  """The per-pair split (module docstring): stable under reordering and re-sharding of the files."""
  return zlib.crc32(f"{os.path.basename(path)}:{offset}".encode()) % PER_10K < fraction * PER_10K


def tokenize_preference_shard(out: str, shard, spec, vocab_size: int) -> dict:
  """Encodes one planned shard's JSONL pieces into a preference shard and writes it (module docstring);
  returns its record. Nothing is written when a line is bad: the ValueError names file:line."""
  dtype = shards_lib.token_dtype(vocab_size)
  pieces, lens, held, where, sources = [], [], [], [], []
  for path, start, stop in shard.files:
    count = 0
    for offset, pair in preference_pairs(path, spec.chat_version, start, stop):
      pieces.append(np.asarray(pair.prompt + pair.chosen + pair.rejected, dtype))
      lens.append((len(pair.prompt), len(pair.chosen), len(pair.rejected)))
      held.append(is_heldout_pair(path, offset, spec.heldout_fraction))
      where.append(offset)
      count += 1
    sources.append([path, count])
  lens_P3 = np.asarray(lens, np.int32).reshape(-1, 3)
  totals = lens_P3.sum(axis=1).astype(np.int64)
  held_P = np.asarray(held, np.uint8)
  parts = {"tokens": np.concatenate(pieces) if pieces else np.zeros(0, dtype),
           "docs": np.concatenate([[0], np.cumsum(totals)[:-1]]).astype(np.int64) if pieces else np.zeros(0, np.int64),
           "lens": lens_P3, "heldout": held_P, "where": np.asarray(where, np.uint64)}
  split_counts = {split: {"tokens": int(totals[held_P == flag].sum()), "documents": int((held_P == flag).sum())}
                  for split, flag in (("train", 0), ("heldout", 1))}
  record = {"key": shard.key, "split": shard.split, "tokens": int(totals.sum()), "documents": len(pieces),
            "pairs": split_counts, "sources": sources, "input_bytes": shard.bytes}
  return shards_lib.write_shard(out, shard.name, parts, record)


def preference_splits(records: list[dict]) -> dict:
  """The manifest's ``splits`` for preference shards: every shard under both, with each split's pair and
  token counts (module docstring)."""
  splits = {}
  for split in ("train", "heldout"):
    counts = [r["pairs"][split] for r in records]
    splits[split] = {"tokens": sum(c["tokens"] for c in counts), "documents": sum(c["documents"] for c in counts),
                     "shards": [{k: r[k] for k in ("name", "tokens", "documents", "files")} for r in records]}
  return splits


class PreferenceRows:
  """The pairs of one split of a preference shard set as rows for ``pipeline.BatchIterator``: row i is
  pair i's chosen and rejected rows (``preference.pair_rows_fields``, each field ``[2, T]``), exactly
  what ``preference.PairRows`` gives for the same pairs."""

  def __init__(self, shard_set, seq_len: int):
    if shard_set.kind != "preference":
      raise ValueError(f"{shard_set.directory} holds {shard_set.kind} shards, not preference pairs; make them with "
                       "mixtral-jax tokenize --preference")
    self.shards, self.seq_len = shard_set, seq_len
    flag = 1 if shard_set.split == "heldout" else 0
    shard_of, start, lens = [], [], []
    for k, r in enumerate(shard_set.records):
      part = lambda name, dtype: shards_lib.ShardFile(  # noqa: E731
          os.path.join(shard_set.directory, f"{r['name']}.{name}"), dtype).read_all()
      keep = part("heldout", np.uint8) == flag
      shard_of.append(np.full(int(keep.sum()), k, np.int32))
      start.append(part("docs", np.int64)[keep])
      lens.append(part("lens", np.int32).reshape(-1, 3)[keep])
    self.shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
    self.start = np.concatenate(start) if start else np.zeros(0, np.int64)
    self.lens = np.concatenate(lens) if lens else np.zeros((0, 3), np.int32)

  def __len__(self) -> int:
    return len(self.start)

  def pair(self, i: int) -> Pair:
    k, s = int(self.shard_of[i]), int(self.start[i])
    p, c, r = (int(n) for n in self.lens[i])
    ids = self.shards.tokens[k].read(s, s + p + c + r).astype(np.int64).tolist()
    return Pair(ids[:p], ids[p:p + c], ids[p + c:])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return pair_rows_fields(self.pair(i), self.seq_len)
