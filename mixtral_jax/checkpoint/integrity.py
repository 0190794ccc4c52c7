"""What a checkpoint's numbers are allowed to be: finite, and the ones that were written.

Non-finite values: :func:`count_nonfinite` counts NaN/Inf in a host block with one ``np.isfinite``
pass (about 0.5 ms per MiB here), so streaming conversion and loading can check every block they move. :class:`FiniteCheck`
totals a tensor's blocks and raises :class:`NonFiniteError` naming the tensor and the count.

Checksums: Orbax's zarr3 layout puts a ``crc32c`` codec on the shard *index* only (orbax
``tensorstore_utils._build_zarr3_metadata``), never on the chunk data, and its zarr2 layout has none, so
a flipped byte in a data file either fails zstd or, worse, decodes to other weights. So every
checkpoint we write gets a digest file beside its ``params/``: ``params.digests.json``, an XXH3-64 per
block of every array (one block per layer for a stacked parameter, the whole array otherwise), over the
array's bytes in C order (:mod:`mixtral_jax.checkpoint.digests`; older checkpoints carry CRC-32s in
``params.crc32.json``, still checked). :func:`verify` re-reads the arrays through TensorStore and compares.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.checkpoint.digests import (DIGEST_FILE, LEGACY_DIGEST_FILE, Digests, block_count, block_digest,  # noqa: F401
                                            digest_path, has_digests, legacy_digest_path)  # (re-exported)
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


@jax.jit
def _all_finite(x):
  # max(|x|) is NaN if any element is (XLA's max propagates NaN) and inf if any is +-inf. One float
  # max-reduction: 5.3 GB/s on this 2-core CPU, where an integer count of ~isfinite ran at 0.6 GB/s.
  return jnp.isfinite(jnp.max(jnp.abs(x)))


class DeviceFiniteCheck:
  """Checks every array for NaN/Inf where it lives, as a load places it. :meth:`add` dispatches one
  fused max-reduction per array or layer slice and does not wait (it overlaps the next read);
  :meth:`finish` fetches all the flags at once and, for a slice that failed, reads it again on the host
  to count its bad elements exactly, then raises :class:`NonFiniteError` for the first such tensor
  (naming it and the count) or, with ``allow``, logs it.

  Why on the device: a load places every tensor there anyway, where the check reads it at memory speed,
  while NumPy's ``isfinite`` over bfloat16 runs at ~0.6-1.4 GB/s on one core here (ml_dtypes has no
  vectorised kernel): minutes for 8x7B's 93 GB. The exact count is only needed on the error path."""

  def __init__(self, where: str, *, allow: bool = False):
    self.where, self.allow = where, allow
    self._flags: list[tuple[str, object, Callable[[], np.ndarray]]] = []
    self._sizes: dict[str, int] = {}

  def add(self, name: str, array, read_again: Callable[[], np.ndarray]):
    """Queues the check of ``array`` (part of tensor ``name``); ``read_again()`` returns the same values
    from the host, read only if the check fails. Returns ``array``."""
    if jnp.issubdtype(array.dtype, jnp.floating) and array.size:
      self._flags.append((name, _all_finite(array), read_again))
    self._sizes[name] = self._sizes.get(name, 0) + int(array.size)
    return array

  def finish(self) -> None:
    flags = jax.device_get([flag for _, flag, _ in self._flags])
    check = FiniteCheck(self.where, allow=self.allow)
    for (name, _, read_again), ok in zip(self._flags, flags):
      if not ok:
        check.add(name, read_again())
    for name in dict.fromkeys(name for name, _, _ in self._flags):
      check.done(name, self._sizes[name])


# ------------------------------------------------------------------------------------ checksums

PREFETCH_BYTES = 2 << 30  # a read group larger than this is not read ahead (host memory holds two)


def _groups(reader, key) -> list[tuple]:
  """The indices an array is read in: whole, or for a stacked parameter whole storage chunks along the
  layer axis (a chunk spanning several layers is decompressed once, not once per layer)."""
  n = block_count(key, reader.shapes[key])
  if n == 1:
    return [()]
  step = max(1, min(n, reader.chunk_shape(key)[0]))
  return [(slice(start, min(start + step, n)),) for start in range(0, n, step)]


def _group_bytes(reader, key, index: tuple) -> int:
  shape = reader.shapes[key]
  rows = index[0].stop - index[0].start if index else shape[0]
  return rows * int(np.prod(shape[1:])) * reader.dtype(key).itemsize


def _blocks(reader, key, first=None):
  """(block index, data) over an array, one digest block (a layer, or the whole array) at a time. The
  next group's read is issued before this one's blocks are handed out, so TensorStore decompresses it
  while the caller checks and places these; ``first`` is the first group's read if already issued."""
  groups = _groups(reader, key)
  pending = first if first is not None else reader.read_async(key, groups[0])
  for g, index in enumerate(groups):
    group = pending.result()
    nxt = groups[g + 1] if g + 1 < len(groups) else None
    pending = reader.read_async(key, nxt) if nxt and _group_bytes(reader, key, nxt) <= PREFETCH_BYTES else None
    if not index:
      yield 0, group
      continue
    for i in range(group.shape[0]):
      yield index[0].start + i, group[i]
    if nxt and pending is None:
      pending = reader.read_async(key, nxt)


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
  unstacked array) against its digest file and (unless ``check_finite`` is False, for a caller that
  counts on the device) for NaN/Inf the first time it is read. Layers are read in storage-chunk groups
  (:func:`_blocks`), so a loader asking for them in order reads every byte once; with ``order`` (the
  keys in the order they will be asked for) the first group of the next array is read while the
  current one is consumed. ``expected`` is None (after a note) for a checkpoint written before digests
  existed."""

  def __init__(self, params_dir: str, *, allow_nonfinite: bool = False, check_finite: bool = True,
               order: list[tuple[str, ...]] | None = None):
    self.params_dir = os.path.abspath(params_dir)
    self.where = os.path.dirname(self.params_dir)
    self.algorithm, self.expected = _load_digests(self.params_dir)
    with _unreadable(self.where, "its array index"):
      self.reader = ParamsReader(self.params_dir)
    self.shapes = self.reader.shapes
    self.finite = FiniteCheck(self.where, allow=allow_nonfinite) if check_finite else None
    self._next = dict(zip(order, order[1:])) if order else {}
    self._prefetched: dict[tuple[str, ...], object] = {}
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
        raise ChecksumError(f"{self.where}: array {name} has no recorded digest; the checkpoint was altered "
                            "after it was written")
    first = self._prefetched.pop(key, None)
    nxt = self._next.get(key)
    if nxt is not None and nxt in self.shapes and nxt not in self._prefetched:
      index = _groups(self.reader, nxt)[0]
      if _group_bytes(self.reader, nxt, index) <= PREFETCH_BYTES:
        self._prefetched[nxt] = self.reader.read_async(nxt, index)
    last = block_count(key, self.shapes[key]) - 1
    for i, block in _guarded(_blocks(self.reader, key, first), self.where, f"array {name}"):
      if want is not None and block_digest(self.algorithm, block) != want[self.algorithm][i]:
        part = f" (layer {i})" if len(want[self.algorithm]) > 1 else ""
        raise ChecksumError(f"{self.where}: array {name}{part} fails its checksum ({self.algorithm}): the "
                            "checkpoint's data is corrupt; restore it from a copy or re-convert it")
      if self.finite is not None:
        self.finite.add(name, block)
        if i == last:
          self.finite.done(name, int(np.prod(self.shapes[key])))
      yield i, block


def _load_digests(params_dir: str) -> tuple[str | None, dict | None]:
  """(algorithm, {array name: entry}) from the digest file beside ``params_dir`` (or the CRC-32 file of
  an older checkpoint); (None, None), after a note, when there is neither."""
  for path in (digest_path(params_dir), legacy_digest_path(params_dir)):
    try:
      with open(path) as f:
        found = json.load(f)
      algorithm = found.get("algorithm", "crc32")
      block_digest(algorithm, np.zeros(0, np.uint8))  # an unknown algorithm is refused here, not per block
      return algorithm, found["arrays"]
    except FileNotFoundError:
      continue
    except (ValueError, KeyError, AttributeError) as e:
      raise ChecksumError(f"{path} is corrupt ({e}); restore it from a copy, or delete it to load the "
                          "checkpoint unverified") from None
  log.warning("note: %s has no %s (written before mixtral-jax recorded checksums, or a training step whose run "
              "stopped before sealing it); loading it unverified", os.path.dirname(params_dir), DIGEST_FILE)
  return None, None


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
