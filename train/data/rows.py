"""Rows of T tokens (+1 for the shifted targets) cut from the shards of one split, read on demand.

Text: row i of a shard is the window of T + 1 tokens starting at i * T (a shard's last partial window is
dropped; rows never straddle shards). Inside a row, a segment id counts documents (packed documents never
attend to each other), positions restart at 0 at each document start (a BOS token, since documents are
``<s> text </s>``), and the loss weight is 0 where the target token begins a new document.

Chat: conversations are packed whole into rows, first fit in shard order among the 64 most recently
opened rows (bounded work per conversation); padding has segment id 0 and weight 0. Only the packing
(three small integers per conversation) is kept in memory; tokens are read when a row is asked for.

Preference pairs (DPO): ``preference_shards.PreferenceRows``, one pair per row.

Every row is a dict of ``inputs``, ``targets``, ``segment_ids``, ``positions`` (int32 [T]) and
``weights`` (float32 [T]).
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import files as files_lib
from . import shards as shards_lib
from .preference_shards import PreferenceRows

OPEN_BINS = 64


class ShardSet:
  """The shards of one split of one shard directory: token files (and chat loss masks) by shard."""

  def __init__(self, directory: str, manifest: dict, split: str):
    self.directory, self.manifest, self.split = directory, manifest, split
    self.kind = manifest["kind"]
    self.records = manifest["splits"][split]["shards"]
    path = lambda r, part: os.path.join(directory, f"{r['name']}.{part}")
    self.tokens = [shards_lib.ShardFile(path(r, "tokens"), manifest["dtype"]) for r in self.records]
    self.masks = ([shards_lib.ShardFile(path(r, "mask"), np.uint8) for r in self.records]
                  if self.kind == "chat" else None)
    self.bos_id, self.pad_id = manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["pad_id"]

  @property
  def num_tokens(self) -> int:
    return sum(r["tokens"] for r in self.records)

  def verify(self, which=None) -> None:
    """Checks the sizes and checksums of the shards ``which`` (indices; all by default)."""
    for k in range(len(self.records)) if which is None else which:
      shards_lib.verify_shard(self.directory, {**self.records[k]})

  def docs(self, k: int) -> np.ndarray:
    return shards_lib.ShardFile(os.path.join(self.directory, f"{self.records[k]['name']}.docs"), np.int64).read_all()

  def where(self, k: int, doc: int) -> str:
    """file:line (JSONL), file:row N (Parquet) or the file of document ``doc`` of shard ``k``, for errors."""
    name = self.records[k]["name"]
    with open(os.path.join(self.directory, f"{name}.json")) as f:
      sources = json.load(f)["sources"]
    at = int(shards_lib.ShardFile(os.path.join(self.directory, f"{name}.where"), np.uint64).read(doc, doc + 1)[0])
    first = 0
    for path, count in sources:
      if doc < first + count:
        if path.endswith(files_lib.JSONL):
          return f"{path}:{files_lib.line_of(path, at)}"
        return f"{path}: row {at}" if path.endswith(".parquet") else path
      first += count
    return f"shard {name} document {doc}"


def pack_window(window: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
  """A text row from T + 1 tokens and where documents start in them (module docstring)."""
  T = len(window) - 1
  start = start.copy()
  start[0] = True  # a row is its own context: the first token opens segment 1 at position 0
  seg = np.cumsum(start[:T]).astype(np.int32)
  idx = np.arange(T)
  last_start = np.maximum.accumulate(np.where(start[:T], idx, 0))
  return {"inputs": window[:T], "targets": window[1:], "weights": (~start[1:]).astype(np.float32),
          "segment_ids": seg, "positions": (idx - last_start).astype(np.int32)}


class TextRows:
  """Windows of T + 1 tokens over each shard's document stream (module docstring)."""

  def __init__(self, shard_set: ShardSet, seq_len: int):
    self.shards, self.seq_len = shard_set, seq_len
    per_shard = np.asarray([max(r["tokens"] - 1, 0) // seq_len for r in shard_set.records], np.int64)
    self.ends = np.cumsum(per_shard)

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def row(self, i: int) -> dict[str, np.ndarray]:
    k = int(np.searchsorted(self.ends, i, side="right"))
    r = i - (int(self.ends[k - 1]) if k else 0)
    T = self.seq_len
    window = self.shards.tokens[k].read(r * T, r * T + T + 1).astype(np.int32)
    return pack_window(window, window == self.shards.bos_id)

  __getitem__ = row


def first_fit(lengths, capacity: int, open_bins: int = OPEN_BINS) -> list[list[int]]:
  """Bins of item indices: each item goes to the first of the last ``open_bins`` bins it fits in."""
  bins: list[list[int]] = []
  fill: list[int] = []
  for i, n in enumerate(lengths):
    lo = max(len(bins) - open_bins, 0)
    for b in range(lo, len(bins)):
      if fill[b] + n <= capacity:
        bins[b].append(i)
        fill[b] += n
        break
    else:
      bins.append([i])
      fill.append(int(n))
  return bins


def pack_conversations(examples, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One chat row from (tokens, weights) pairs whose lengths sum to at most T + 1."""
  T = seq_len
  toks = np.full(T + 1, pad_id, np.int32)
  w = np.zeros(T + 1, np.float32)
  seg = np.zeros(T + 1, np.int32)
  pos = np.zeros(T + 1, np.int32)
  at = 0
  for s, (tokens, weights) in enumerate(examples, 1):
    n = len(tokens)
    toks[at:at + n], w[at:at + n], seg[at:at + n], pos[at:at + n] = tokens, weights, s, np.arange(n)
    at += n
  same = seg[1:] == seg[:T]
  return {"inputs": toks[:T], "targets": toks[1:], "weights": w[1:] * same, "segment_ids": seg[:T],
          "positions": pos[:T]}


class PackedChatRows:
  """Conversations of a chat shard set packed whole into rows (module docstring)."""

  def __init__(self, shard_set: ShardSet, seq_len: int):
    self.shards, self.seq_len = shard_set, seq_len
    shard_of, start, length = [], [], []
    for k, r in enumerate(shard_set.records):
      docs = shard_set.docs(k)
      lens = np.diff(np.append(docs, r["tokens"]))
      too_long = np.flatnonzero(lens > seq_len + 1)
      if len(too_long):
        raise ValueError(f"{shard_set.where(k, int(too_long[0]))}: the conversation has {lens[too_long[0]]} tokens, "
                         f"longer than data.seq_len={seq_len} + 1; raise data.seq_len (at most the model's "
                         "max_position_embeddings) or shorten the conversation")
      shard_of.append(np.full(len(docs), k, np.int32))
      start.append(docs)
      length.append(lens.astype(np.int32))
    shard_of, start, length = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (shard_of, start, length))
    bins = first_fit(length, seq_len + 1)
    order = np.asarray([i for b in bins for i in b], np.int64)
    self.shard_of, self.start, self.length = shard_of[order], start[order], length[order]
    self.row_ptr = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)

  def __len__(self) -> int:
    return len(self.row_ptr) - 1

  def row(self, i: int) -> dict[str, np.ndarray]:
    examples = []
    for c in range(self.row_ptr[i], self.row_ptr[i + 1]):
      k, s, n = int(self.shard_of[c]), int(self.start[c]), int(self.length[c])
      examples.append((self.shards.tokens[k].read(s, s + n), self.shards.masks[k].read(s, s + n)))
    return pack_conversations(examples, self.seq_len, self.shards.pad_id)

  __getitem__ = row


def make_rows(shard_set: ShardSet, seq_len: int):
  if shard_set.kind == "preference":
    return PreferenceRows(shard_set, seq_len)
  return PackedChatRows(shard_set, seq_len) if shard_set.kind == "chat" else TextRows(shard_set, seq_len)
