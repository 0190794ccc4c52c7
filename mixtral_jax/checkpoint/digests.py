"""The digest file of a checkpoint's ``params/``: ``params.digests.json``, an XXH3-64 digest per block of
every array (one block per layer for a stacked parameter, the whole array otherwise), over the array's
bytes in C order. Written as arrays stream out (:class:`Digests`); checked by
:mod:`mixtral_jax.checkpoint.integrity`, which reads them back. Kept apart from ``integrity`` so that
the writer (``orbax_io``) and the checker (which reads through ``orbax_io``) import it one way.

Why XXH3-64 and not CRC-32: a load reads every byte of the checkpoint once, and the digest is the one
pass over those bytes that the unchecked load does not make. zlib's CRC-32 runs at about 0.7-1.3 GB/s
on this project's CPU machines, XXH3 at 3-10 GB/s (``benchmarks/load_checks.py``); both catch any
flipped byte, and a random corruption passes either with probability 2^-32 or less.

Checkpoints written before this change carry ``params.crc32.json`` (CRC-32, same layout): they are still
verified, with :func:`block_digest` choosing the algorithm the file names.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import xxhash

DIGEST_FILE = "params.digests.json"
LEGACY_DIGEST_FILE = "params.crc32.json"
ALGORITHM = "xxh3_64"


def block_count(key: tuple[str, ...], shape: tuple[int, ...]) -> int:
  """Blocks a digest covers: one per layer for a stacked parameter (``blocks.*``), else one."""
  return shape[0] if key and key[0] == "blocks" and len(shape) >= 2 else 1


def _raw(data: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def block_digest(algorithm: str, data: np.ndarray) -> int:
  """The digest of one whole block under ``algorithm`` (``xxh3_64``, or ``crc32`` for old files)."""
  if algorithm == ALGORITHM:
    return xxhash.xxh3_64_intdigest(_raw(data))
  if algorithm == "crc32":
    return zlib.crc32(_raw(data))
  raise ValueError(f"unknown checkpoint digest algorithm {algorithm!r}; this mixtral-jax reads {ALGORITHM} and crc32")


class Digests:
  """XXH3-64 per block of every array, fed in C order (any split into consecutive pieces works: the
  hash state streams)."""

  def __init__(self):
    self.arrays: dict[str, dict] = {}
    self._state: dict[str, list] = {}

  def start(self, key: tuple[str, ...], shape: tuple[int, ...], dtype) -> None:
    name = ".".join(key)
    self.arrays[name] = {"shape": list(shape), "dtype": np.dtype(dtype).name}
    self._state[name] = [xxhash.xxh3_64() for _ in range(block_count(key, shape))]

  def add(self, key: tuple[str, ...], block_index: int, data: np.ndarray) -> None:
    self._state[".".join(key)][block_index].update(_raw(data))

  def save(self, params_dir: str) -> None:
    for name, states in self._state.items():
      self.arrays[name][ALGORITHM] = [s.intdigest() for s in states]
    path = digest_path(params_dir)
    with open(path + ".tmp", "w") as f:
      json.dump({"algorithm": ALGORITHM, "blocks": "per layer of blocks.*, else whole", "arrays": self.arrays}, f)
    os.replace(path + ".tmp", path)


def digest_path(params_dir: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(params_dir)), DIGEST_FILE)


def legacy_digest_path(params_dir: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(params_dir)), LEGACY_DIGEST_FILE)


def has_digests(params_dir: str) -> bool:
  return os.path.exists(digest_path(params_dir)) or os.path.exists(legacy_digest_path(params_dir))
