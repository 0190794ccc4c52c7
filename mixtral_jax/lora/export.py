"""``mixtral-jax export RUN DST --merge | --peft``: a LoRA run's adapters, merged into its base as Hugging
Face safetensors, or as a PEFT adapter for the Hugging Face base.

The base is the one the run recorded (``lora.json``), or ``base=`` (e.g. after moving it); either way its
architecture must match the run's fingerprint, checked before any weight is read. ``--merge`` holds the
base in float32 in host memory (the adapters are added there), then writes it through the ordinary
streaming export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

from . import factors as factors_lib
from . import merge as merge_lib
from . import run as run_lib
from .peft_io import write_peft


def _base_path(rec: dict, base: str | None) -> str | None:
  return os.path.abspath(base) if base else rec["base"]["checkpoint"]


def export_lora(run: str, dst: str, *, merge: bool, base: str | None = None, overwrite: bool = False,
                dtype=None, max_shard_size="2GB", progress: Callable[[str], None] = lambda _: None) -> str:
  from mixtral_jax.checkpoint import formats  # noqa: PLC0415

  rec = run_lib.read(run)
  base_path = _base_path(rec, base)
  dst = os.path.abspath(dst)
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists; choose another destination or pass --overwrite")
  if base_path is not None:
    from mixtral_jax.checkpoint import load_config  # noqa: PLC0415
    run_lib.check_base(rec, load_config(base_path), run, f"base {base_path}")
  step, flat = run_lib.latest_adapters(run)
  factors = factors_lib.from_tree(flat, run_lib.section(rec).scale)
  cfg = run_lib.base_config(rec)
  factors_lib.check_shapes(factors, cfg, run)
  progress(f"{run}: adapters of step {step} ({', '.join(f.target for f in factors)}, rank "
           f"{rec['lora']['rank']}) on base {base_path or 'preset ' + repr(rec['base']['preset'])}")
  if not merge:
    with formats.atomic_dir(dst, overwrite=overwrite) as tmp:
      write_peft(factors, cfg, tmp, base_path=base_path)
    progress(f"wrote PEFT adapter {dst}")
    return dst

  from mixtral_jax import checkpoint  # noqa: PLC0415
  if base_path is not None:
    model = checkpoint.load(base_path, param_dtype="float32")
  else:  # a run on a random preset model (tests, demos): rebuild it from its seed
    from flax import nnx  # noqa: PLC0415

    from mixtral_jax.model import Mixtral  # noqa: PLC0415
    model = Mixtral(cfg.replace(param_dtype="float32"), rngs=nnx.Rngs(rec["base"]["seed"]))
  merged = merge_lib.merge_into(model, factors)
  del model
  with tempfile.TemporaryDirectory(prefix="mixtral-jax-merge-", dir=os.path.dirname(dst)) as scratch:
    saved = checkpoint.save(merged, os.path.join(scratch, "merged"))
    tokenizer = formats.find_tokenizer(run)
    if tokenizer:
      shutil.copy(tokenizer, os.path.join(saved, formats.TOKENIZER))
    del merged
    checkpoint.export(saved, dst, overwrite=overwrite, dtype=dtype, max_shard_size=max_shard_size,
                      progress=progress)
  return dst
