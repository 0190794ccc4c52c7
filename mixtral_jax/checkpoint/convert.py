"""Writing our format: ``convert`` streams a foreign checkpoint into it; ``save`` writes a model in memory.

Conversion validates every tensor name and shape against the config before creating anything, then
reads and writes one block at a time: one layer of a stacked parameter, one expert of one layer of an
expert parameter. Peak host memory is about one such block plus I/O buffers, not the model (measured
in ``benchmarks/convert_rss.py``). Output goes to a temporary sibling renamed at the end; the
temporaries of killed earlier runs are removed first (:mod:`staging`), and a destination inside the
source is refused. Every block is checked for NaN/Inf on its way through (:mod:`integrity`; the error
names the tensor and the count) and its XXH3-64 digest recorded in ``params.digests.json``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.checkpoint import formats, integrity, orbax_io, staging
from mixtral_jax.checkpoint.loading import config_for, open_plan, our_shapes, runtime_overrides
from mixtral_jax.model import Mixtral


def _units(axes) -> int:
  """Leading axes that split a parameter into write blocks: (layer, expert), (layer), or none."""
  if axes[:2] == ("layers", "experts"):
    return 2
  return 1 if axes[:1] == ("layers",) else 0


def _quiet(_: str) -> None:
  """Default progress sink."""


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False, param_dtype=None,
            allow_nonfinite: bool = False, progress: Callable[[str], None] = _quiet) -> str:
  """HF or consolidated directory -> our checkpoint at ``dst`` (config.json, params/, tokenizer.model if
  the source has one). ``param_dtype`` defaults to the source's storage dtype. A tensor holding NaN/Inf
  is an error (:class:`integrity.NonFiniteError`) unless ``allow_nonfinite``. Returns ``dst``."""
  found = formats.detect(src)
  if found.kind == "orbax":
    raise ValueError(f"{src} is already a mixtral-jax Orbax checkpoint; nothing to convert "
                     "(use 'mixtral-jax export' to go to Hugging Face safetensors)")
  dst = os.path.abspath(os.fspath(dst))
  staging.refuse_inside(found.directory, dst, "convert")
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists; choose another destination or pass --overwrite")
  staging.remove_stale(dst, say=progress)
  cfg = config_for(found, runtime_overrides(None, param_dtype, {}))
  plan = open_plan(found, cfg)
  dtype = np.dtype(jnp.dtype(param_dtype)) if param_dtype is not None else plan.dtype()
  cfg = cfg.replace(param_dtype=str(jnp.dtype(dtype)))
  shapes, axes = our_shapes(cfg)
  progress(f"{found.kind} checkpoint at {found.directory}: {len(plan.expected())} tensors, "
           f"{plan.nbytes() / 2**30:.2f} GiB, validated against {os.path.basename(found.config)}")
  finite = integrity.FiniteCheck(found.directory, allow=allow_nonfinite)
  with formats.atomic_dir(dst, overwrite=overwrite) as tmp, staging.owned(tmp):
    cfg.save(os.path.join(tmp, formats.CONFIG))
    specs = {}
    for key, shape in shapes.items():
      u = _units(axes[key])
      specs[key] = (shape, dtype, (1,) * u + shape[u:])
    writer = orbax_io.StreamingWriter(os.path.join(tmp, formats.PARAMS_DIR), specs)
    for key, shape in shapes.items():
      u = _units(axes[key])
      for index in itertools.product(*(range(n) for n in shape[:u])):
        writer.write(key, index, finite.add(".".join(key), plan.read(key, index, dtype)))
      finite.done(".".join(key), int(np.prod(shape)))
      progress(f"  wrote {'.'.join(key)} {list(shape)} {dtype}")
    writer.finalize()
    tokenizer = formats.find_tokenizer(found.directory)
    if tokenizer and os.path.dirname(tokenizer) == found.directory:
      shutil.copy(tokenizer, os.path.join(tmp, formats.TOKENIZER))
  progress(f"wrote {dst}")
  return dst


def save(model: Mixtral, dst: str | os.PathLike, *, overwrite: bool = False) -> str:
  """Our checkpoint of a model in memory: config.json and params/ (Orbax). Returns ``dst``."""
  dst = os.path.abspath(os.fspath(dst))
  with formats.atomic_dir(dst, overwrite=overwrite) as tmp:
    model.cfg.save(os.path.join(tmp, formats.CONFIG))
    params_dir = os.path.join(tmp, formats.PARAMS_DIR)
    orbax_io.save_params(params_dir, nnx.state(model, nnx.Param).to_pure_dict())
    integrity.seal(params_dir)
  return dst
