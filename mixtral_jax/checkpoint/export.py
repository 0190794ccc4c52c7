"""Our Orbax checkpoint (or a training run) -> Hugging Face safetensors that
``transformers.MixtralForCausalLM.from_pretrained`` loads: the Hub's per-expert key names (the inverse of
the table in ``hf.py``), ``config.json``, sharded files with ``model.safetensors.index.json`` when the
model exceeds ``max_shard_size`` (one ``model.safetensors`` otherwise), and ``tokenizer.model`` if the
checkpoint has one.

Streaming: each output tensor is read from the checkpoint as the block it needs (one layer, one
expert) just before it is written, so memory holds one tensor at a time.

Safety (:mod:`staging`, :mod:`integrity`): the checkpoint is verified first (each array's digest, no
NaN/Inf; one extra read), a destination equal to or inside the checkpoint is refused, and the
temporaries of killed earlier exports to the same destination are removed before writing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable

import jax.numpy as jnp
import numpy as np

from mixtral_jax import param_paths
from mixtral_jax.checkpoint import formats, integrity, orbax_io, staging
from mixtral_jax.checkpoint.loading import check_orbax_shapes, config_for, our_shapes
from mixtral_jax.checkpoint.safetensors_io import Entry, nbytes, write_safetensors
from mixtral_jax.config import MixtralConfig

DEFAULT_SHARD_SIZE = "2GB"


def parse_size(size: str | int) -> int:
  """"2GB", "500MB", "10KiB" or a byte count -> bytes (decimal units like transformers, binary with 'i')."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
  if not m:
    raise ValueError(f"size {size!r} is not understood; write e.g. '2GB', '500MB' or a byte count")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


def hf_entries(cfg: MixtralConfig, reader: orbax_io.ParamsReader, dtype: np.dtype) -> list[Entry]:
  """Every Hub tensor with its shape and a function that reads and lays it out when called: the rows of
  ``mixtral_jax.param_paths`` in their order, the consecutive per-layer rows written layer by layer (and a
  layer's per-expert rows expert by expert after its other tensors)."""
  s = param_paths.sizes(cfg)

  def entry(w: param_paths.Weight, index: tuple[int, ...]) -> Entry:
    layout = param_paths.ours_to_torch(w, cfg)
    name = w.hf.format(**dict(zip("le", index)))
    return Entry(name, tuple(s[a] for a in w.torch), dtype, lambda: layout(reader.read(w.key, index)).astype(dtype))

  out, rows = [], list(param_paths.WEIGHTS)
  while rows:
    if rows[0].unit == 0:
      out.append(entry(rows.pop(0), ()))
      continue
    layer_rows = []
    while rows and rows[0].unit > 0:
      layer_rows.append(rows.pop(0))
    for l in range(cfg.num_hidden_layers):
      out += [entry(w, (l,)) for w in layer_rows if w.unit == 1]
      out += [entry(w, (l, e)) for e in range(cfg.num_local_experts) for w in layer_rows if w.unit == 2]
  return out


def _shards(entries: list[Entry], limit: int) -> list[list[Entry]]:
  shards, size = [[]], 0
  for e in entries:
    if shards[-1] and size + nbytes(e) > limit:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes(e)
  return shards


def export(ckpt: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False, dtype=None,
           max_shard_size: str | int = DEFAULT_SHARD_SIZE, progress: Callable[[str], None] = lambda _: None) -> str:
  """Writes ``ckpt`` (our format, or a training run / step) as Hugging Face safetensors at ``dst``.
  ``dtype`` defaults to the checkpoint's storage dtype. Returns ``dst``."""
  found = formats.detect(ckpt)
  if found.kind != "orbax":
    raise ValueError(f"{ckpt} is a {found.kind} checkpoint; export reads mixtral-jax Orbax checkpoints "
                     "(convert it first with 'mixtral-jax convert', or load it directly)")
  dst = os.path.abspath(os.fspath(dst))
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists; choose another destination or pass --overwrite")
  staging.refuse_inside(found.directory, dst, "export")  # --overwrite would delete the checkpoint itself
  limit = parse_size(max_shard_size)
  cfg = config_for(found, {})
  # One read of every array against its digest and for NaN/Inf before anything is written: a corrupt
  # checkpoint is named here, not exported as a valid-looking Hub directory. (The layer-by-layer
  # VerifiedReader would re-read each stacked array from its first layer, as export interleaves arrays.)
  integrity.verify(found.params)
  check_orbax_shapes(found.params, our_shapes(cfg)[0], found.config)
  reader = orbax_io.ParamsReader(found.params)
  out_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else reader.dtype(param_paths.LARGEST)
  shards = _shards(hf_entries(cfg, reader, out_dtype), limit)
  progress(f"exporting {found.params} ({reader.nbytes() / 2**30:.2f} GiB) as {len(shards)} safetensors file(s), "
           f"{out_dtype}")
  staging.remove_stale(dst, say=progress)  # temporaries of killed exports to dst
  with formats.atomic_dir(dst, overwrite=overwrite) as tmp, staging.owned(tmp):
    cfg.replace(param_dtype=str(jnp.dtype(out_dtype))).save(os.path.join(tmp, formats.CONFIG))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
      write_safetensors(os.path.join(tmp, name), shard)
      weight_map.update({e.name: name for e in shard})
      progress(f"  wrote {name} ({sum(map(nbytes, shard)) / 2**20:.1f} MiB, {len(shard)} tensors)")
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(nbytes(e) for s in shards for e in s)}, "weight_map": weight_map}
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    tokenizer = formats.find_tokenizer(found.directory)
    if tokenizer:
      shutil.copy(tokenizer, os.path.join(tmp, formats.TOKENIZER))
  progress(f"wrote {dst}")
  return dst
