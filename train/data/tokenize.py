"""Tokenize once into shards: plan, parallel workers, resumable atomic writes, the manifest.

Algorithm:
  1. Find the input files (``files.find_files``) and split them into train and held-out by a hash of
     each path (``files.split_files``), as training always has.
  2. Plan shards: each split's files, in sorted order, are cut into groups of about ``shard_mb`` MB of
     input. A shard's key hashes the tokenizer fingerprint, the kind, the field/template and every
     file's path, size and mtime, so the plan is a pure function of the inputs.
  3. Skip every planned shard whose record (``<name>.json``) is already there with the same key; hand
     the others to ``workers`` processes (one shard per task). A worker tokenizes each document
     (text: ``<s> text </s>``; chat: mistral-common's template with assistant-turn loss weights) and
     writes the shard's files atomically, its record last (``shards.write_shard``).
  4. Write ``manifest.json`` (atomically) from the records once every shard is there.

A run killed at any point leaves complete shards and temporary files; the rerun removes the temporary
files of dead writers and tokenizes only the missing shards. A rerun over a finished directory checks
every shard the manifest lists (record, sizes, CRC-32) and rebuilds the missing or corrupt ones, so
"rerun tokenize" is the fix the shard errors advise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import sys
import time

import numpy as np

from . import files as files_lib
from . import shards as shards_lib

TEXT_EXTENSIONS = (".txt", ".md", ".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class TokenizeSpec:
  tokenizer: str  # a path to the tokenizer.model (resolved)
  kind: str = "text"  # text | chat | preference (DPO pairs: ``preference_shards``)
  field: str = "text"  # JSONL field / Parquet column holding the text (text kind)
  chat_version: str = "v1"  # mistral-common instruct template (chat kind)
  heldout_fraction: float = 0.02
  shard_mb: float = 32.0  # input bytes per shard, about


@dataclasses.dataclass(frozen=True)
class PlannedShard:
  name: str
  split: str
  files: tuple  # (path, start, stop) pieces in order: whole files (0, None), JSONL byte or Parquet row-group ranges
  bytes: int  # input bytes
  key: str


def plan(file_pairs, spec: TokenizeSpec, fingerprint: str) -> list[PlannedShard]:
  """The shards for these (root, path) files, deterministic in the inputs (module docstring, step 2)."""
  # preference pairs are held out one by one (preference_shards), so every file goes to the train plan
  by_file = 0.0 if spec.kind == "preference" else spec.heldout_fraction
  train, held = files_lib.split_files(file_pairs, by_file)
  if not train:
    raise ValueError(f"all {len(file_pairs)} input files fell in the held-out split; add files or lower the "
                     "held-out fraction")
  what = f"{fingerprint}|{spec.kind}|{spec.field if spec.kind == 'text' else spec.chat_version}"
  if spec.kind == "preference":  # the per-pair held-out flags are part of the shards
    what += f"|{spec.heldout_fraction}"
  target = max(int(spec.shard_mb * 2**20), 1)
  planned = []
  for split, group in (("train", train), ("heldout", held)):
    current, size = [], 0
    cuts = []
    for _, path in group:
      st = os.stat(path)
      for start, stop in files_lib.pieces(path, st.st_size, target):
        current.append((path, start, stop, st.st_size, st.st_mtime_ns))
        size += st.st_size if stop is None and start == 0 else _piece_bytes(path, start, stop, st.st_size)
        if size >= target:
          cuts.append((current, size))
          current, size = [], 0
    if current:
      cuts.append((current, size))
    for i, (members, size) in enumerate(cuts):
      h = hashlib.sha256(what.encode())
      for m in members:
        h.update("|".join(map(str, ("", *m))).encode())
      planned.append(PlannedShard(f"{split}-{i:05d}", split, tuple(m[:3] for m in members), size,
                                  h.hexdigest()[:16]))
  return planned


def _piece_bytes(path: str, start: int, stop: int | None, size: int) -> int:
  """Input bytes of a piece, for shard sizes and the progress bar (Parquet pieces: a share by row groups)."""
  if path.endswith(files_lib.JSONL):
    return (size if stop is None else stop) - start
  import pyarrow.parquet as pq  # noqa: PLC0415
  meta = pq.ParquetFile(path).metadata
  return sum(meta.row_group(g).total_byte_size for g in range(start, meta.num_row_groups if stop is None else stop))


def plan_key(planned: list[PlannedShard]) -> str:
  return hashlib.sha256("|".join(s.key for s in planned).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ the worker

_TOKENIZER = {}


def _tokenizer(path: str):
  if path not in _TOKENIZER:
    from mixtral_jax.tokenizer import Tokenizer  # noqa: PLC0415
    _TOKENIZER[path] = Tokenizer.load(path)
  return _TOKENIZER[path]


def tokenize_shard(task, on_piece=None) -> dict:
  """Tokenizes one planned shard and writes it (module docstring, step 3); returns its record.
  ``on_piece(input_bytes, tokens)`` is called after each file piece (the in-process progress bar)."""
  out, shard, spec = task
  tok = _tokenizer(spec.tokenizer)
  if spec.kind == "preference":
    from .preference_shards import tokenize_preference_shard  # noqa: PLC0415 - mistral-common only for pairs
    record = tokenize_preference_shard(out, shard, spec, tok.vocab_size)
    if on_piece is not None:
      on_piece(shard.bytes, record["tokens"])
    return record
  dtype = shards_lib.token_dtype(tok.vocab_size)
  pieces, masks, where, sources = [], [], [], []
  for path, start, stop in shard.files:
    count = 0
    if spec.kind == "chat":
      from .chat import chat_examples  # noqa: PLC0415 - mistral-common only for chat
      for at, ids, weights in chat_examples(path, spec.chat_version, start, stop):
        pieces.append(np.asarray(ids, dtype))
        masks.append(np.asarray(weights, np.uint8))
        where.append(at)
        count += 1
    else:
      for at, text in files_lib.text_documents(path, spec.field, start, stop):
        if not text.strip():
          continue
        pieces.append(np.asarray(tok.encode(text, bos=True, eos=True), dtype))
        where.append(at)
        count += 1
    sources.append([path, count])
    if on_piece is not None:
      size = os.path.getsize(path)
      on_piece(size if start == 0 and stop is None else _piece_bytes(path, start, stop, size),
               sum(len(p) for p in pieces[len(pieces) - count:]))
  lengths = np.asarray([len(p) for p in pieces], np.int64)
  parts = {"tokens": np.concatenate(pieces) if pieces else np.zeros(0, dtype),
           "docs": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if pieces else np.zeros(0, np.int64),
           "where": np.asarray(where, np.uint64)}
  if spec.kind == "chat":
    parts["mask"] = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
  record = {"key": shard.key, "split": shard.split, "tokens": int(lengths.sum()), "documents": len(pieces),
            "sources": sources, "input_bytes": shard.bytes}
  return shards_lib.write_shard(out, shard.name, parts, record)


# ------------------------------------------------------------------------------ the run


def tokenize(sources, out: str, spec: TokenizeSpec, *, workers: int = 1, extensions=TEXT_EXTENSIONS,
             progress: bool = True, log=None, pairs=None) -> dict:
  """Tokenizes ``sources`` (files, directories, globs, "stdlib") into shards in ``out``; returns the
  manifest. Resumable (module docstring). ``pairs``: the (root, file) list already found, if it was."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  exts = (".jsonl", ".json") if spec.kind in ("chat", "preference") else extensions
  pairs = pairs if pairs is not None else files_lib.find_files(sources, exts)
  fingerprint = shards_lib.tokenizer_fingerprint(spec.tokenizer)
  planned = plan(pairs, spec, fingerprint)
  key = plan_key(planned)
  os.makedirs(out, exist_ok=True)
  manifest_path = os.path.join(out, shards_lib.MANIFEST)
  if os.path.exists(manifest_path):
    manifest = shards_lib.load_manifest(out)
    if manifest.get("plan_key") != key:
      raise FileExistsError(f"{out} already holds a finished tokenization of other inputs (or another "
                            "tokenizer); choose a new --out, or delete it to re-tokenize")
    broken = damaged_shards(out, manifest)
    if not broken:
      return manifest
    log(f"tokenize: rebuilding {len(broken)} missing or corrupt shard(s) in {out}: {', '.join(broken[:5])}")
    for name in broken:  # their records go first, so the plan below sees them as not done
      for entry in os.listdir(out):
        if entry.startswith(name + "."):
          os.remove(os.path.join(out, entry))
  shards_lib.remove_stale_temporaries(out)
  records = {}
  todo = []
  for s in planned:
    record = shards_lib.read_shard_record(out, s.name)
    if record is not None and record.get("key") == s.key:
      records[s.name] = record
    else:
      todo.append(s)
  if records:
    log(f"tokenize: {len(records)} of {len(planned)} shards already complete in {out}; doing the other {len(todo)}")
  total_bytes = sum(s.bytes for s in todo)
  n_files = sum(len(s.files) for s in todo)  # file pieces
  bar = _Progress(total_bytes, n_files, enabled=progress)
  tasks = [(out, s, spec) for s in todo]
  try:
    if workers <= 1 or len(tasks) <= 1:
      for t in tasks:
        r = tokenize_shard(t, on_piece=bar.piece)
        records[r["name"]] = r
    else:
      with multiprocessing.get_context(_start_method()).Pool(min(workers, len(tasks))) as pool:
        for r in pool.imap_unordered(tokenize_shard, tasks):
          records[r["name"]] = r
          bar.update(r)
  finally:
    bar.close()
  manifest = _manifest(planned, records, spec, fingerprint, key, sources)
  if manifest["splits"]["train"]["tokens"] == 0:
    raise ValueError(f"the {len(pairs)} input files under {list(map(str, sources))} hold no "
                     f"{ {'chat': 'conversations', 'preference': 'training pairs'}.get(spec.kind, 'text')} (empty source); check the paths")
  shards_lib.write_json_atomic(manifest_path, manifest)
  return manifest


def damaged_shards(out: str, manifest: dict) -> list[str]:
  """Names of the shards ``manifest`` lists whose record or files are missing, or whose files fail their
  size or CRC-32 check (step 5 of a rerun: a finished directory is checked, not trusted)."""
  broken = []
  for split in manifest["splits"].values():
    for shard in split["shards"]:
      record = shards_lib.read_shard_record(out, shard["name"])
      try:
        if record is None:
          raise ValueError("missing")
        shards_lib.verify_shard(out, record)
      except ValueError:
        broken.append(shard["name"])
  return broken


def _start_method() -> str:
  """fork while no JAX backend runs in this process (no runtime threads to copy: the CLI's case; a spawned
  worker would spend seconds re-importing the package), spawn once one does (first use inside training)."""
  try:
    from jax._src import xla_bridge  # noqa: PLC0415
    running = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    running = True
  return "spawn" if running or sys.platform != "linux" else "fork"


def _manifest(planned, records, spec, fingerprint, key, sources) -> dict:
  tok = _tokenizer(spec.tokenizer)
  splits = {}
  if spec.kind == "preference":
    from .preference_shards import preference_splits  # noqa: PLC0415
    splits = preference_splits([records[s.name] for s in planned])
  for split in () if splits else ("train", "heldout"):
    recs = [records[s.name] for s in planned if s.split == split]
    splits[split] = {"tokens": sum(r["tokens"] for r in recs), "documents": sum(r["documents"] for r in recs),
                     "shards": [{k: r[k] for k in ("name", "tokens", "documents", "files")} for r in recs]}
  return {
      "format_version": shards_lib.FORMAT_VERSION, "kind": spec.kind, "plan_key": key,
      "tokenizer": {"fingerprint": fingerprint, "path": spec.tokenizer, "vocab_size": tok.vocab_size,
                    "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
      "dtype": np.dtype(shards_lib.token_dtype(tok.vocab_size)).name,
      "field": spec.field, "chat_version": spec.chat_version, "heldout_fraction": spec.heldout_fraction,
      "sources": [str(s) for s in sources], "splits": splits,
  }


class _Progress:
  """A tqdm bar over input bytes (so the ETA is honest) with files done and tokens/s beside it."""

  def __init__(self, total_bytes: int, n_files: int, enabled: bool):
    self.bar = None
    self.files, self.n_files, self.tokens, self.t0 = 0, n_files, 0, time.perf_counter()
    if enabled and total_bytes:
      from tqdm import tqdm  # noqa: PLC0415
      self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", dynamic_ncols=True)
      self.bar.set_postfix_str(f"files 0/{n_files}")

  def update(self, record: dict) -> None:
    """A shard finished in a worker process."""
    self._advance(len(record["sources"]), record["input_bytes"], record["tokens"])

  def piece(self, input_bytes: int, tokens: int) -> None:
    """A file piece finished in this process."""
    self._advance(1, input_bytes, tokens)

  def _advance(self, files: int, input_bytes: int, tokens: int) -> None:
    self.files += files
    self.tokens += tokens
    if self.bar is not None:
      rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
      self.bar.set_postfix_str(f"files {self.files}/{self.n_files}, {rate:,.0f} tokens/s", refresh=False)
      self.bar.update(input_bytes)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
