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


def text_documents(path: str, field: str = "text") -> Iterator[str]:
  """The documents of one file (module docstring), in file order."""
  if path.endswith(".parquet"):
    yield from _parquet_column(path, field)
  elif path.endswith(JSONL):
    for n, record in jsonl_records(path):
      value = record.get(field) if isinstance(record, dict) else None
      if not isinstance(value, str):
        raise ValueError(f"{path}:{n}: no string field {field!r} in this JSONL line; give every line one, "
                         "or name the field that holds the text (--field / data.field)")
      yield value
  else:
    yield read_text(path)


def jsonl_records(path: str) -> Iterator[tuple[int, object]]:
  """(line number, parsed JSON) for every non-blank line."""
  for n, line in enumerate(read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      yield n, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None


def _parquet_column(path: str, field: str) -> Iterator[str]:
  import pyarrow.parquet as pq  # noqa: PLC0415 - only for Parquet input
  try:
    f = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
    raise ValueError(f"cannot read {path} as Parquet ({e})") from None
  if field not in f.schema_arrow.names:
    raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(f.schema_arrow.names)}); name the "
                     "text column with --field / data.field")
  for g in range(f.num_row_groups):  # one row group at a time: memory stays bounded by the group
    for value in f.read_row_group(g, columns=[field]).column(0).to_pylist():
      if value:
        yield value
