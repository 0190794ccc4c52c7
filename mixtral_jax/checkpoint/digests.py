"""The digest file of a checkpoint's ``params/``: ``params.crc32.json``, a CRC-32 per block of every
array (one block per layer for a stacked parameter, the whole array otherwise), over the array's bytes
in C order. Written as arrays stream out (:class:`Digests`); checked by
:mod:`mixtral_jax.checkpoint.integrity`, which reads them back. Kept apart from ``integrity`` so that
the writer (``orbax_io``) and the checker (which reads through ``orbax_io``) import it one way."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

DIGEST_FILE = "params.crc32.json"


def block_count(key: tuple[str, ...], shape: tuple[int, ...]) -> int:
  """Blocks a digest covers: one per layer for a stacked parameter (``blocks.*``), else one."""
  return shape[0] if key and key[0] == "blocks" and len(shape) >= 2 else 1


class Digests:
  """CRC-32 per block of every array, fed in C order (any split into consecutive pieces works)."""

  def __init__(self):
    self.arrays: dict[str, dict] = {}

  def start(self, key: tuple[str, ...], shape: tuple[int, ...], dtype) -> None:
    self.arrays[".".join(key)] = {"shape": list(shape), "dtype": np.dtype(dtype).name,
                                  "crc32": [0] * block_count(key, shape)}

  def add(self, key: tuple[str, ...], block_index: int, data: np.ndarray) -> None:
    entry = self.arrays[".".join(key)]
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    entry["crc32"][block_index] = zlib.crc32(raw, entry["crc32"][block_index])

  def save(self, params_dir: str) -> None:
    path = digest_path(params_dir)
    with open(path + ".tmp", "w") as f:
      json.dump({"algorithm": "crc32", "blocks": "per layer of blocks.*, else whole", "arrays": self.arrays}, f)
    os.replace(path + ".tmp", path)


def digest_path(params_dir: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(params_dir)), DIGEST_FILE)
