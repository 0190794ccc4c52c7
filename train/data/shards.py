"""Token shards on disk: the format, atomic writes, checksums, the manifest, and reads by offset.

A shard directory (what ``mixtral-jax tokenize`` writes, and what training reads) holds::

  manifest.json           kind (text|chat), tokenizer {fingerprint, vocab_size, bos/eos/pad ids}, token
                          dtype, and per split (train, heldout) the token and document counts and the
                          shards, each with its byte sizes and CRC-32 checksums
  <split>-<n>.tokens      the split's documents' tokens, back to back (uint16 when the vocabulary fits,
                          else uint32); text documents are ``<s> text </s>``, so BOS marks their starts
  <split>-<n>.docs        int64 offset of every document's first token
  <split>-<n>.where       uint64 byte offset (JSONL line) or row (Parquet) of every document in its file,
                          for errors that name file:line
  <split>-<n>.mask        chat only: uint8 loss weight of every token (1 on assistant turns)
  <split>-<n>.json        the shard's record; written last, so its presence means the shard is complete

Every file is written to a temporary name and renamed into place, so a killed writer leaves only complete
shards (plus temporary files, removed by the next run). Readers use ``os.pread`` on plain file
descriptors rather than ``mmap``: pages a mapping touches count in the process's RSS, so a long run over a
big corpus would grow; pread goes through the page cache, and the process keeps only the rows it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import zlib

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PARTS = ("tokens", "docs", "where", "mask")


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenizer_fingerprint(path: str) -> str:
  """SHA-256 (first 16 hex digits) of the tokenizer model file: the same file gives the same ids."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def crc32_file(path: str, chunk: int = 8 << 20) -> str:
  """CRC-32 of a file, read in chunks (through the page cache, not into the process's RSS)."""
  crc = 0
  with open(path, "rb", buffering=0) as f:
    while block := f.read(chunk):
      crc = zlib.crc32(block, crc)
  return f"{crc:08x}"


def _tmp_name(path: str) -> str:
  return f"{os.path.dirname(path)}/.tmp-{socket.gethostname()}-{os.getpid()}-{os.path.basename(path)}"


def write_atomic(path: str, data: bytes | np.ndarray) -> None:
  tmp = _tmp_name(path)
  with open(tmp, "wb") as f:
    f.write(data.tobytes() if isinstance(data, np.ndarray) else data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
  write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def remove_stale_temporaries(directory: str) -> int:
  """Removes temporary files of writers on this host that are no longer running; returns how many."""
  host, removed = socket.gethostname(), 0
  for name in os.listdir(directory):
    if not name.startswith(f".tmp-{host}-"):
      continue
    pid = int(name[len(f".tmp-{host}-"):].split("-", 1)[0])
    try:
      os.kill(pid, 0)
      continue  # still running (another writer of the same directory)
    except ProcessLookupError:
      pass
    except PermissionError:
      continue
    os.remove(os.path.join(directory, name))
    removed += 1
  return removed


def write_shard(directory: str, name: str, parts: dict[str, np.ndarray], record: dict) -> dict:
  """Writes a shard's parts, then its record (with sizes and checksums), each atomically; returns it."""
  files = {}
  for part, array in parts.items():
    path = os.path.join(directory, f"{name}.{part}")
    write_atomic(path, array)
    files[part] = {"bytes": int(array.nbytes), "crc32": crc32_file(path)}
  record = {**record, "name": name, "files": files}
  write_json_atomic(os.path.join(directory, f"{name}.json"), record)
  return record


def read_shard_record(directory: str, name: str) -> dict | None:
  """The record of a complete shard, or None when the shard is missing or was never finished."""
  path = os.path.join(directory, f"{name}.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  for part, meta in record.get("files", {}).items():
    p = os.path.join(directory, f"{name}.{part}")
    if not os.path.exists(p) or os.path.getsize(p) != meta["bytes"]:
      return None
  return record


# ------------------------------------------------------------------------------ reading


def load_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    if os.path.isdir(directory) and any(n.endswith(".json") for n in os.listdir(directory)):
      raise ValueError(f"{directory} holds shards but no {MANIFEST}: its tokenize run did not finish; rerun "
                       "the same mixtral-jax tokenize command to complete it")
    raise FileNotFoundError(f"{directory} is not a token-shard directory (no {MANIFEST}); make one with "
                            f"mixtral-jax tokenize SRC... --out {directory}")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: shard format version {manifest.get('format_version')}, this reader knows "
                     f"{FORMAT_VERSION}; re-tokenize with this version of mixtral-jax")
  return manifest


def check_tokenizer(manifest: dict, directory: str, fingerprint: str, tokenizer_path: str) -> None:
  theirs = manifest["tokenizer"]["fingerprint"]
  if theirs != fingerprint:
    raise ValueError(f"{directory} was tokenized with tokenizer {theirs} ({manifest['tokenizer']['path']}) but "
                     f"this run uses {fingerprint} ({tokenizer_path}); re-tokenize it with the run's "
                     "tokenizer, or set data.tokenizer to the one it was made with")


def verify_shard(directory: str, record: dict) -> None:
  """Raises naming the shard when a file's size or CRC-32 differs from its record."""
  for part, meta in record["files"].items():
    path = os.path.join(directory, f"{record['name']}.{part}")
    if not os.path.exists(path):
      raise ValueError(f"shard {path} is missing; rerun the mixtral-jax tokenize (or train) command that made "
                       f"{directory}: it rebuilds the shard")
    size = os.path.getsize(path)
    if size != meta["bytes"]:
      raise ValueError(f"shard {path} has {size} bytes, its record says {meta['bytes']}: it is truncated or "
                       f"overwritten; rerun the mixtral-jax tokenize (or train) command that made {directory}: it "
                       "rebuilds the shard")
    crc = crc32_file(path)
    if crc != meta["crc32"]:
      raise ValueError(f"shard {path} fails its checksum (CRC-32 {crc}, manifest {meta['crc32']}): the file is "
                       f"corrupt; rerun the mixtral-jax tokenize (or train) command that made {directory}: it "
                       "rebuilds the shard")


class ShardFile:
  """One part of one shard, read by element offset with ``os.pread`` (module docstring).

  Each read opens and closes the file (a few microseconds): a corpus of thousands of shards, all touched
  by a global shuffle, would otherwise hold more descriptors than the process may open."""

  def __init__(self, path: str, dtype):
    self.path, self.dtype = path, np.dtype(dtype)

  def read(self, start: int, stop: int) -> np.ndarray:
    n, size = stop - start, self.dtype.itemsize
    fd = os.open(self.path, os.O_RDONLY)
    try:
      data = os.pread(fd, n * size, start * size)
    finally:
      os.close(fd)
    if len(data) != n * size:
      raise ValueError(f"shard {self.path} is shorter than its record (wanted elements {start}:{stop}); "
                       "re-tokenize its directory")
    return np.frombuffer(data, self.dtype)

  def read_all(self) -> np.ndarray:
    return np.fromfile(self.path, self.dtype)
