"""safetensors without torch: a validating header parser, lazy memory-mapped reads, a streaming writer.

File layout (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 N, then N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data
block; offsets are relative to the start of the data block.

Reading maps the file and returns NumPy views; bf16 comes from ``ml_dtypes`` (a JAX dependency), so no
torch is needed. After copying what it needs out of a view, a caller calls :meth:`SafetensorsFile.release`
so the pages it touched leave this process's resident set: a whole checkpoint streamed through one
process never stays resident.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


class TensorInfo(NamedTuple):
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # absolute byte offset in the file
  end: int


class SafetensorsFile:
  """One ``.safetensors`` file: header parsed and checked against the file size on open."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, the 8-byte header length "
                         "is missing); re-download or re-export it")
      (n,) = struct.unpack("<Q", head)
      if n > _MAX_HEADER or 8 + n > size:
        raise ValueError(f"{self.path}: corrupt or truncated safetensors file: header length {n} does not fit "
                         f"in the file's {size} bytes; re-download or re-export it")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{self.path}: corrupt safetensors header ({e}); re-download or re-export it") from None
    if not isinstance(header, dict):
      raise ValueError(f"{self.path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    self.tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
      try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise ValueError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}") from None
      expected = math.prod(shape) * dtype.itemsize
      if not 0 <= begin <= end or end - begin != expected:
        raise ValueError(f"{self.path}: tensor {name!r} has data offsets [{begin}, {end}] but shape {list(shape)} "
                         f"{entry['dtype']} needs {expected} bytes; the file is corrupt")
      if end > data_size:
        raise ValueError(f"{self.path}: truncated file: tensor {name!r} ends at data byte {end} but the file holds "
                         f"only {data_size} data bytes; re-download or re-export it")
      self.tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    self._mm: mmap.mmap | None = None

  def read(self, name: str) -> np.ndarray:
    """A read-only view of tensor ``name`` straight from the mapped file (no copy)."""
    info = self.tensors[name]
    if self._mm is None:
      with open(self.path, "rb") as f:
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    count = math.prod(info.shape)
    return np.frombuffer(self._mm, info.dtype, count, info.begin).reshape(info.shape)

  def release(self, name: str) -> None:
    """Drops tensor ``name``'s pages from this process's resident set (the OS page cache keeps them)."""
    if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
      return
    info = self.tensors[name]
    start = info.begin - info.begin % mmap.PAGESIZE
    if info.end > start:
      self._mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)


# ------------------------------------------------------------------------------------ writing

class Entry(NamedTuple):
  """A tensor to write: its name, shape, dtype, and a function producing its data when its turn comes."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]


def nbytes(entry: Entry) -> int:
  return math.prod(entry.shape) * np.dtype(entry.dtype).itemsize


def write_safetensors(path: str | os.PathLike, entries: Iterable[Entry], metadata: dict | None = None) -> None:
  """Writes a safetensors file tensor by tensor: the header first (shapes are known up front), then
  each tensor's bytes as ``produce()`` returns them, so only one tensor is in memory at a time."""
  entries = list(entries)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for e in entries:
    size = nbytes(e)
    header[e.name] = {"dtype": DTYPE_NAMES[np.dtype(e.dtype)], "shape": list(e.shape),
                      "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data block starts 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for e in entries:
      data = np.ascontiguousarray(e.produce(), dtype=e.dtype)
      if data.shape != tuple(e.shape):
        raise ValueError(f"{path}: tensor {e.name!r} was produced with shape {data.shape}, expected {e.shape}")
      f.write(data.reshape(-1).view(np.uint8))  # the bytes in place, no second copy


class SafetensorsSource:
  """The tensors of several safetensors files (a sharded checkpoint) by name."""

  def __init__(self, paths: Iterable[str | os.PathLike]):
    self.files = [SafetensorsFile(p) for p in paths]
    self._by_name: dict[str, SafetensorsFile] = {}
    for f in self.files:
      for name in f.tensors:
        if name in self._by_name:
          raise ValueError(f"tensor {name!r} appears in both {self._by_name[name].path} and {f.path}; "
                           "remove the stray file")
        self._by_name[name] = f

  def names(self) -> list[str]:
    return list(self._by_name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._by_name[name].tensors[name].shape

  def dtype(self, name: str) -> np.dtype:
    return self._by_name[name].tensors[name].dtype

  def read(self, name: str) -> np.ndarray:
    return self._by_name[name].read(name)

  def release(self, name: str) -> None:
    self._by_name[name].release(name)

  def where(self, name: str) -> str:
    return self._by_name[name].path
