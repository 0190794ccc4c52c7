"""The data pipeline: files -> token rows [T] -> deterministic, resumable, per-process batches [A, b, T].

Text (pretraining): files are found (``"stdlib"`` means the Python standard library's own source, from
``sysconfig``, without its tests and site-packages), split into train and held-out *by file* (a hash of
the path relative to its root, so the split never changes with the file order or count), and tokenized
as documents ``<s> text </s>``. The documents of a split are concatenated into one stream, cached in the
workdir (``WORKDIR/data/``) so reruns skip tokenization. Row i is the window of T + 1 tokens starting at
i * T. Inside a row, a segment id counts documents (packed documents never attend to each other),
positions restart at 0 at each document start, and the loss weight is 0 where the target token begins a
new document.

Chat (SFT): each JSONL line is ``{"messages": [...]}`` ending with an assistant turn. It is encoded by
mistral-common's instruct template (``mixtral_jax.chat.encode_chat``); the loss weight is 1 exactly on
the assistant turns' tokens and their closing ``</s>``. Conversations are packed whole, in file order,
into rows of T tokens (first fit); padding has segment id 0 and weight 0. A conversation longer than T
is an error naming its line.

Batches: every epoch visits the rows in a fresh permutation (seeded by the seed and the epoch). Global
batch j of the epoch is rows ``perm[j*B:(j+1)*B]``, reshaped to ``[A, B/A, T]`` microbatches; each process keeps the
columns of every microbatch that its devices hold, so the global batch, and therefore the losses, do
not depend on the process count. The iterator's whole state is {"epoch", "batch"}.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import zlib

import numpy as np

from .config import TrainConfig

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ------------------------------------------------------------------------------ finding files


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def find_files(paths, extensions) -> list[tuple[str, str]]:
  """(root, file) pairs, sorted, for every path: a file, a directory (walked, by extension) or a glob."""
  found: list[tuple[str, str]] = []
  for spec in paths:
    if spec == "stdlib":
      spec = stdlib_root()
    if os.path.isdir(spec):
      for dirpath, dirnames, filenames in os.walk(spec):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found += [(spec, os.path.join(dirpath, f)) for f in sorted(filenames) if f.endswith(tuple(extensions))]
    elif os.path.isfile(spec):
      found.append((os.path.dirname(spec) or ".", spec))
    else:
      matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
      if not matches:
        raise FileNotFoundError(f"data path {spec!r} is not a file, a directory or a glob that matches anything")
      found += [(os.path.dirname(m) or ".", m) for m in matches if os.path.isfile(m)]
  if not found:
    raise ValueError(f"no input files with extensions {list(extensions)} under {list(paths)}; "
                     "point data.paths at files, directories or globs that hold data")
  return sorted(set(found), key=lambda rf: rf[1])


def is_heldout(root: str, path: str, fraction: float) -> bool:
  """Deterministic per-file split: a CRC of the relative path picks the held-out files."""
  key = os.path.relpath(path, root).encode()
  return (zlib.crc32(key) % 10_000) < fraction * 10_000


def split_files(files, fraction: float):
  """(train, heldout) file lists. With fraction > 0 and at least two files, held-out is never empty."""
  held = [f for f in files if is_heldout(*f, fraction)]
  if fraction > 0 and not held and len(files) > 1:
    held = [min(files, key=lambda rf: zlib.crc32(os.path.relpath(rf[1], rf[0]).encode()))]
  train = [f for f in files if f not in held]
  return train, held


def read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it or "
                     "remove it from data.paths") from None
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e.strerror}; fix its permissions or remove it from data.paths") from None


# ------------------------------------------------------------------------------ text rows


def _cache_key(files, tokenizer_path: str, kind: str) -> str:
  h = hashlib.sha256(f"{kind}|{tokenizer_path}".encode())
  for _, f in files:
    st = os.stat(f)
    h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def tokenize_documents(files, tokenizer, cache_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [n], document start offsets int64 [docs]) of ``<s> text </s>`` documents, cached."""
  cache = None
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
    cache = os.path.join(cache_dir, f"text-{_cache_key(files, tokenizer.path, 'text')}.npz")
    if os.path.exists(cache):
      with np.load(cache) as z:
        return z["tokens"], z["starts"]
  pieces, starts, n = [], [], 0
  for _, f in files:
    text = read_text(f)
    if not text.strip():
      continue
    ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), np.int32)
    starts.append(n)
    pieces.append(ids)
    n += len(ids)
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  starts_arr = np.asarray(starts, np.int64)
  if cache:
    tmp = f"{cache}.{os.getpid()}.tmp.npz"  # processes sharing the workdir each write their own
    np.savez(tmp, tokens=tokens, starts=starts_arr)
    os.replace(tmp, cache)
  return tokens, starts_arr


class TextRows:
  """Overlapping windows of T + 1 tokens over a document stream (see the module docstring)."""

  def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len
    self.is_start = np.zeros(len(tokens) + 1, bool)
    self.is_start[starts] = True

  def __len__(self) -> int:
    return max(len(self.tokens) - 1, 0) // self.seq_len

  def row(self, i: int) -> dict[str, np.ndarray]:
    T = self.seq_len
    window = self.tokens[i * T: i * T + T + 1]
    start = self.is_start[i * T: i * T + T + 1].copy()
    start[0] = True  # a row is its own context: the first token opens segment 1 at position 0
    seg = np.cumsum(start[:T]).astype(np.int32)
    idx = np.arange(T)
    last_start = np.maximum.accumulate(np.where(start[:T], idx, 0))
    return {"inputs": window[:T], "targets": window[1:], "weights": (~start[1:]).astype(np.float32),
            "segment_ids": seg, "positions": (idx - last_start).astype(np.int32)}


# ------------------------------------------------------------------------------ chat rows


def assistant_spans(messages: list[dict], version: str) -> tuple[list[int], list[float]]:
  """Tokens of a conversation ending with an assistant turn, and per-token loss weights (1 on every
  assistant turn's tokens and its ``</s>``).

  The full sequence is the template with the last turn as a prefix, plus ``</s>``. Each assistant turn's
  tokens are what its prefix encoding adds to the conversation before it; they are then located, in
  order, in the full sequence, followed by ``</s>`` (the template places system prompts and tools
  differently in truncated conversations, so offsets alone are not trusted)."""
  from mixtral_jax.chat import encode_chat, mistral_tokenizer  # noqa: PLC0415 (mistral-common is slow to import)
  if not messages or messages[-1].get("role") != "assistant":
    raise ValueError("an SFT conversation must end with an assistant turn (the text to learn)")
  eos = mistral_tokenizer(version).instruct_tokenizer.tokenizer.eos_id
  full = encode_chat(messages[:-1] + [{**messages[-1], "prefix": True}], version=version) + [eos]
  weights = [0.0] * len(full)
  cursor = 0
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    before = encode_chat(messages[:i], version=version) if i else []
    with_answer = encode_chat(messages[:i] + [{**m, "prefix": True}], version=version)
    answer = with_answer[len(before):] if with_answer[:len(before)] == before else None
    at = _find(full, answer + [eos], cursor) if answer else -1
    if at < 0:
      raise ValueError(f"could not locate assistant turn {i} in the encoded conversation ({version}); "
                       "this template's encoding of the turn depends on context")
    for j in range(at, at + len(answer) + 1):
      weights[j] = 1.0
    cursor = at + len(answer) + 1
  return full, weights


def _find(seq: list[int], sub: list[int], start: int) -> int:
  for j in range(start, len(seq) - len(sub) + 1):
    if seq[j:j + len(sub)] == sub:
      return j
  return -1


def chat_examples(files, version: str, seq_len: int) -> list[tuple[list[int], list[float]]]:
  examples = []
  for _, f in files:
    for n, line in enumerate(read_text(f).splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        messages = record["messages"] if isinstance(record, dict) else record
        tokens, weights = assistant_spans(messages, version)
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{f}:{n}: not a usable chat example ({e}); each line must be "
                         '{"messages": [...]} ending with an assistant turn') from None
      if len(tokens) > seq_len + 1:
        raise ValueError(f"{f}:{n}: the conversation has {len(tokens)} tokens, longer than data.seq_len="
                         f"{seq_len} + 1; raise data.seq_len (at most the model's max_position_embeddings) "
                         "or shorten the conversation")
      examples.append((tokens, weights))
  return examples


class PackedChatRows:
  """Conversations packed whole into rows of T (+1 for the shifted targets), first fit in order."""

  def __init__(self, examples, seq_len: int, pad_id: int):
    T = seq_len
    bins: list[list[int]] = []
    fill: list[int] = []
    for i, (tokens, _) in enumerate(examples):
      n = len(tokens)
      for b, used in enumerate(fill):
        if used + n <= T + 1:
          bins[b].append(i)
          fill[b] += n
          break
      else:
        bins.append([i])
        fill.append(n)
    self.rows = []
    for members in bins:
      toks = np.full(T + 1, pad_id, np.int32)
      w = np.zeros(T + 1, np.float32)
      seg = np.zeros(T + 1, np.int32)
      pos = np.zeros(T + 1, np.int32)
      at = 0
      for s, i in enumerate(members, 1):
        tokens, weights = examples[i]
        n = len(tokens)
        toks[at:at + n], w[at:at + n], seg[at:at + n], pos[at:at + n] = tokens, weights, s, np.arange(n)
        at += n
      same = seg[1:] == seg[:T]
      self.rows.append({"inputs": toks[:T], "targets": toks[1:], "weights": w[1:] * same,
                        "segment_ids": seg[:T], "positions": pos[:T]})

  def __len__(self) -> int:
    return len(self.rows)

  def row(self, i: int) -> dict[str, np.ndarray]:
    return self.rows[i]


# ------------------------------------------------------------------------------ batches


class BatchIterator:
  """Deterministic, resumable global batches, each process keeping its own columns (module docstring)."""

  def __init__(self, rows, batch_size: int, grad_accum: int, seed: int, *, shuffle: bool = True,
               local: slice = slice(None)):
    """``local``: the columns of each microbatch this process feeds (``sharding.distributed.
    process_batch_slice``); all of them in a single-process run."""
    if len(rows) < batch_size:
      raise ValueError(f"the data holds {len(rows)} rows of data.seq_len tokens but one batch needs "
                       f"data.batch_size={batch_size}; add data or lower data.batch_size / data.seq_len")
    self.rows, self.B, self.A, self.seed, self.shuffle, self.local = rows, batch_size, grad_accum, seed, shuffle, local
    self.epoch, self.batch = 0, 0
    self._perm_epoch, self._perm = None, None

  @property
  def batches_per_epoch(self) -> int:
    return len(self.rows) // self.B

  def state(self) -> dict:
    return {"epoch": self.epoch, "batch": self.batch}

  def restore(self, state: dict) -> None:
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

  def _order(self) -> np.ndarray:
    if self._perm_epoch != self.epoch:
      n = len(self.rows)
      self._perm = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
      self._perm_epoch = self.epoch
    return self._perm

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.batch >= self.batches_per_epoch:
      self.epoch, self.batch = self.epoch + 1, 0
    ids = self._order()[self.batch * self.B:(self.batch + 1) * self.B]
    self.batch += 1
    rows = [self.rows.row(int(i)) for i in ids]
    return {k: np.stack([r[k] for r in rows]).reshape(self.A, self.B // self.A, -1)[:, self.local]
            for k in rows[0]}


# ------------------------------------------------------------------------------ building


def build_rows(cfg: TrainConfig, tokenizer, cache_dir: str | None):
  """(train rows, held-out rows or None), checking the input before anything is compiled."""
  d = cfg.data
  files = find_files(d.paths, d.extensions if d.format == "text" else (".jsonl", ".json"))
  if d.max_files:
    files = files[:d.max_files]
  train_files, held_files = split_files(files, d.heldout_fraction)
  if not train_files:
    raise ValueError(f"all {len(files)} input files fell in the held-out split; add files or lower "
                     "data.heldout_fraction")
  if d.format == "chat":
    make = lambda fs: PackedChatRows(chat_examples(fs, d.chat_version, d.seq_len), d.seq_len, tokenizer.pad_id)
  else:
    def make(fs):
      tokens, starts = tokenize_documents(fs, tokenizer, cache_dir)
      if len(tokens) == 0:
        raise ValueError(f"the {len(fs)} input files hold no text; check data.paths")
      return TextRows(tokens, starts, d.seq_len)
  return make(train_files), (make(held_files) if held_files else None)
