"""What a checkpoint's numbers are allowed to be: finite, and the ones that were written.

Non-finite values: :func:`count_nonfinite` counts NaN/Inf in a host block with one ``np.isfinite``
pass (about 0.5 ms per MiB here), so streaming conversion and loading can check every block they move. :class:`FiniteCheck`
totals a tensor's blocks and raises :class:`NonFiniteError` naming the tensor and the count.

Checksums: Orbax's zarr3 layout puts a ``crc32c`` codec on the shard *index* only (orbax
``tensorstore_utils._build_zarr3_metadata``), never on the chunk data, and its zarr2 layout has none, so
a flipped byte in a data file either fails zstd or, worse, decodes to other weights. So every
checkpoint we write gets a digest file beside its ``params/``: ``params.crc32.json``, a CRC-32 per
block of every array (one block per layer for a stacked parameter, the whole array otherwise), over the
array's bytes in C order. :func:`verify` re-reads the arrays through TensorStore and compares.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib

import numpy as np

from mixtral_jax.checkpoint.digests import DIGEST_FILE, Digests, block_count, digest_path  # noqa: F401 (re-exported)
from mixtral_jax.checkpoint.orbax_io import ParamsReader

ALLOW_HINT = "pass --allow-nonfinite (allow_nonfinite=True) if this is deliberate"
log = logging.getLogger("mixtral_jax.checkpoint")

_ML_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz", "float8_e4m3fnuz", "float8_e5m2fnuz")


class NonFiniteError(ValueError):
  """A tensor holds NaN or Inf values (a ``ValueError``, so the CLI prints it as one line)."""


class ChecksumError(ValueError):
  """An array's bytes differ from the ones written (a ``ValueError``: one line in the CLI)."""


def count_nonfinite(block: np.ndarray) -> int:
  """How many elements of ``block`` are NaN or +-Inf (0 for integer and bool arrays). ``np.isfinite``
  reads any strides in one pass (a transposed view costs no copy), bfloat16 included (ml_dtypes)."""
  block = np.asarray(block)
  if not (np.issubdtype(block.dtype, np.floating) or block.dtype.name in _ML_FLOATS):
    return 0
  finite = np.isfinite(block)
  return 0 if finite.all() else int(block.size - np.count_nonzero(finite))


class FiniteCheck:
  """Totals the non-finite elements of each tensor over the blocks it streams through; :meth:`done`
  raises for a tensor that had any (unless ``allow``, when it only logs)."""

  def __init__(self, where: str, *, allow: bool = False):
    self.where, self.allow = where, allow
    self.bad: dict[str, int] = {}

  def add(self, name: str, block: np.ndarray) -> np.ndarray:
    n = count_nonfinite(block)
    if n:
      self.bad[name] = self.bad.get(name, 0) + n
    return block

  def done(self, name: str, size: int) -> None:
    n = self.bad.get(name, 0)
    if not n:
      return
    message = f"{self.where}: tensor {name} holds {n} NaN/Inf value(s) out of {size}"
    if self.allow:
      log.warning("%s (allowed)", message)
      return
    raise NonFiniteError(f"{message}; the file is corrupt or the weights diverged: re-download or re-convert "
                         f"it, or {ALLOW_HINT}")


def nonfinite_on_device(arrays: dict[tuple, object]) -> dict[tuple, int]:
  """{key: NaN/Inf count} of the arrays (jax.Arrays, possibly sharded) that hold any, counted where they
  live: one small reduction per array, no copy to the host."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  counts = {k: jnp.sum(~jnp.isfinite(a)) for k, a in arrays.items() if jnp.issubdtype(a.dtype, jnp.floating)}
  counts = jax.device_get(counts)
  return {k: int(n) for k, n in counts.items() if n}


def raise_nonfinite(where: str, counts: dict[tuple, int], sizes: dict[tuple, int], *, allow: bool) -> None:
  """Raises (or with ``allow`` logs) :class:`NonFiniteError` for the first tensor in ``counts``."""
  check = FiniteCheck(where, allow=allow)
  for key in sorted(counts):
    check.bad[".".join(key)] = counts[key]
    check.done(".".join(key), sizes[key])


# ------------------------------------------------------------------------------------ checksums

def _blocks(reader, key):
  """(block index, data) over an array, one digest block at a time. Reads go in whole storage chunks
  along the layer axis (a chunk spanning several layers is decompressed once, not once per layer), so
  host memory holds one chunk's worth of layers."""
  n = block_count(key, reader.shapes[key])
  if n == 1:
    yield 0, reader.read(key)
    return
  step = max(1, min(n, reader.chunk_shape(key)[0]))
  for start in range(0, n, step):
    group = reader.read(key, (slice(start, min(start + step, n)),))
    for i in range(group.shape[0]):
      yield start + i, group[i]


def seal(params_dir: str) -> None:
  """Writes the digest file of an existing Orbax params directory by reading it back (a checkpoint
  written by Orbax itself, e.g. a training step)."""
  reader = ParamsReader(params_dir)
  digests = Digests()
  for key in sorted(reader.shapes):
    digests.start(key, reader.shapes[key], reader.dtype(key))
    for i, block in _blocks(reader, key):
      digests.add(key, i, block)
  digests.save(params_dir)


@contextlib.contextmanager
def _unreadable(where: str, what: str):
  """TensorStore's storage errors (a damaged OCDBT node, zstd frame or zarr header) as one ChecksumError."""
  try:
    yield
  except (ValueError, RuntimeError, OSError) as e:
    if isinstance(e, (ChecksumError, NonFiniteError)):
      raise
    detail = str(e).split(" [tensorstore_spec")[0][:240]
    raise ChecksumError(f"{where}: {what} cannot be read, the checkpoint's data is corrupt ({detail}); restore it "
                        "from a copy or re-convert it") from None


def _guarded(blocks, where: str, what: str):
  it = iter(blocks)
  while True:
    with _unreadable(where, what):
      try:
        item = next(it)
      except StopIteration:
        return
    yield item


class VerifiedReader:
  """Reads an Orbax params directory block by block, checking each digest block (one layer, or a whole
  unstacked array) against ``params.crc32.json`` and for NaN/Inf the first time it is read. Layers are
  read in storage-chunk groups (:func:`_blocks`), so a loader asking for them in order reads every byte
  once. ``expected`` is None (after a note) for a checkpoint written before digests existed."""

  def __init__(self, params_dir: str, *, allow_nonfinite: bool = False):
    self.params_dir = os.path.abspath(params_dir)
    self.where = os.path.dirname(self.params_dir)
    self.expected = _load_digests(self.params_dir)
    with _unreadable(self.where, "its array index"):
      self.reader = ParamsReader(self.params_dir)
    self.shapes = self.reader.shapes
    self.finite = FiniteCheck(self.where, allow=allow_nonfinite)
    self._key, self._blocks, self._cache = None, None, {}

  def read(self, key: tuple[str, ...], index: tuple = ()) -> np.ndarray:
    """``array[index]`` where ``index`` starts with the layer for a stacked array (the layer block is
    verified as it is first read; a layer before the current one is read again, unverified twice)."""
    stacked = block_count(key, self.shapes[key]) > 1
    block = index[0] if stacked and index else 0
    if self._key != key or (block not in self._cache and self._cache and block < min(self._cache)):
      self._key, self._blocks, self._cache = key, self._checked(key), {}
    while block not in self._cache:
      i, data = next(self._blocks)
      self._cache = {i: data}
    rest = index[1:] if stacked else index
    return self._cache[block][rest] if rest else self._cache[block]

  def _checked(self, key):
    name = ".".join(key)
    want = None
    if self.expected is not None:
      want = self.expected.get(name)
      if want is None:
        raise ChecksumError(f"{self.where}: array {name} is not in {DIGEST_FILE}; the checkpoint was altered "
                            "after it was written")
    for i, block in _guarded(_blocks(self.reader, key), self.where, f"array {name}"):
      if want is not None and zlib.crc32(np.ascontiguousarray(block).reshape(-1).view(np.uint8)) != want["crc32"][i]:
        part = f" (layer {i})" if len(want["crc32"]) > 1 else ""
        raise ChecksumError(f"{self.where}: array {name}{part} fails its CRC-32 check: the checkpoint's data is "
                            "corrupt; restore it from a copy or re-convert it")
      self.finite.add(name, block)
      if i == block_count(key, self.shapes[key]) - 1:
        self.finite.done(name, int(np.prod(self.shapes[key])))
      yield i, block


def _load_digests(params_dir: str) -> dict | None:
  try:
    with open(digest_path(params_dir)) as f:
      return json.load(f)["arrays"]
  except FileNotFoundError:
    log.warning("note: %s has no %s (written before mixtral-jax recorded checksums, or a training step whose run "
                "stopped before sealing it); loading it unverified", os.path.dirname(params_dir), DIGEST_FILE)
    return None
  except (ValueError, KeyError) as e:
    raise ChecksumError(f"{digest_path(params_dir)} is corrupt ({e}); restore it from a copy, or delete it to "
                        "load the checkpoint unverified") from None


def verify(params_dir: str, *, allow_nonfinite: bool = False) -> bool:
  """Reads every array of the checkpoint once through :class:`VerifiedReader`. Raises
  :class:`ChecksumError` naming the array (and layer) and the checkpoint, or :class:`NonFiniteError`.
  Returns False, after a note, for a checkpoint written before digests existed (its values are still
  checked for NaN/Inf)."""
  reader = VerifiedReader(params_dir, allow_nonfinite=allow_nonfinite)
  for key, shape in sorted(reader.shapes.items()):
    for layer in range(block_count(key, shape)):
      reader.read(key, (layer,) if block_count(key, shape) > 1 else ())
  return reader.expected is not None
