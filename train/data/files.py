"""Finding input files, the held-out split by file, and reading documents out of each file kind.

A source spec is a file, a directory (walked, keeping files with the given extensions, skipping tests and
site-packages), a glob, or ``"stdlib"`` (the Python standard library's own source, from ``sysconfig``).
The held-out split is by *file*: a CRC of the path relative to its root, so it never changes with the
file order or count.

Documents: a ``.jsonl``/``.json`` file holds one per line (its ``field``, ``text`` by default); a
``.parquet`` file one per row (the ``field`` column, read one row group at a time); any other file is
one document. For chat data every JSONL line is ``{"messages": [...]}``.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import zlib
from typing import Iterator

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
JSONL = (".jsonl", ".json")


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def find_files(paths, extensions) -> list[tuple[str, str]]:
  """(root, file) pairs, sorted, for every path: a file, a directory (walked, by extension) or a glob."""
  found: list[tuple[str, str]] = []
  for spec in paths:
    spec = str(spec)
    if spec == "stdlib":
      spec = stdlib_root()
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
      for dirpath, dirnames, filenames in os.walk(spec):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found += [(spec, os.path.join(dirpath, f)) for f in sorted(filenames) if f.endswith(tuple(extensions))]
    elif os.path.isfile(spec):
      found.append((os.path.dirname(spec) or ".", spec))
    else:
      matches = sorted(glob.glob(spec, recursive=True))
      if not matches:
        raise FileNotFoundError(f"data path {spec!r} is not a file, a directory or a glob that matches anything")
      found += [(os.path.dirname(m) or ".", m) for m in matches if os.path.isfile(m)]
  if not found:
    raise ValueError(f"no input files with extensions {list(extensions)} under {list(map(str, paths))}; "
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


def pieces(path: str, size: int, target: int) -> list[tuple[int, int | None]]:
  """(start, stop) pieces of one file for shards of about ``target`` bytes: byte ranges of a JSONL file
  (a line belongs to the piece holding its first byte), row-group ranges of a Parquet file, and the
  whole of any other file (one document cannot be split)."""
  if size <= target:
    return [(0, None)]
  if path.endswith(JSONL):
    return [(a, min(a + target, size)) for a in range(0, size, target)]
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # noqa: PLC0415
    meta = pq.ParquetFile(path).metadata
    out, first, acc = [], 0, 0
    for g in range(meta.num_row_groups):
      acc += meta.row_group(g).total_byte_size
      if acc >= target:
        out.append((first, g + 1))
        first, acc = g + 1, 0
    if first < meta.num_row_groups:
      out.append((first, meta.num_row_groups))
    return out or [(0, None)]
  return [(0, None)]


def line_of(path: str, offset: int) -> int:
  """1-based line number of the byte ``offset`` of a file (counted only when an error names it)."""
  n, done = 1, 0
  with open(path, "rb") as f:
    while done < offset:
      block = f.read(min(8 << 20, offset - done))
      if not block:
        break
      n += block.count(b"\n")
      done += len(block)
  return n


def text_documents(path: str, field: str = "text", start: int = 0,
                   stop: int | None = None) -> Iterator[tuple[int, str]]:
  """(where, text) of the documents of one file piece (module docstring), in file order; ``where`` is
  the byte offset of a JSONL line, the row of a Parquet file, 0 for a whole file."""
  if path.endswith(".parquet"):
    yield from _parquet_column(path, field, start, stop)
  elif path.endswith(JSONL):
    for offset, record in jsonl_records(path, start, stop):
      value = record.get(field) if isinstance(record, dict) else None
      if not isinstance(value, str):
        raise ValueError(f"{path}:{line_of(path, offset)}: no string field {field!r} in this JSONL line; give "
                         "every line one, or name the field that holds the text (--field / data.field)")
      yield offset, value
  else:
    yield 0, read_text(path)


def jsonl_records(path: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, object]]:
  """(byte offset, parsed JSON) of every non-blank line whose first byte lies in [start, stop)."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e.strerror}; fix its permissions or remove it from data.paths") from None
  with f:
    offset = start
    if start > 0:  # the line holding byte start - 1 belongs to the previous piece
      f.seek(start - 1)
      offset = start - 1 + len(f.readline())
    while stop is None or offset < stop:
      raw = f.readline()
      if not raw:
        break
      at, offset = offset, offset + len(raw)
      if not raw.strip():
        continue
      try:
        yield at, json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_of(path, at)}: not UTF-8 text ({e.reason}); convert the file") from None
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_of(path, at)}: not valid JSON ({e.msg}); each line must be one JSON "
                         "object") from None


def _parquet_column(path: str, field: str, start: int, stop: int | None) -> Iterator[tuple[int, str]]:
  import pyarrow.parquet as pq  # noqa: PLC0415 - only for Parquet input
  try:
    f = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
    raise ValueError(f"cannot read {path} as Parquet ({e})") from None
  if field not in f.schema_arrow.names:
    raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(f.schema_arrow.names)}); name the "
                     "text column with --field / data.field")
  row = sum(f.metadata.row_group(g).num_rows for g in range(start))
  for g in range(start, f.num_row_groups if stop is None else stop):  # one row group at a time: bounded memory
    for value in f.read_row_group(g, columns=[field]).column(0).to_pylist():
      if value:
        yield row, value
      row += 1
