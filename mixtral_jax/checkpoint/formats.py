"""Which checkpoint format a path holds, where its tokenizer is, and atomic output directories.

Formats:
  ``hf``            config.json + model.safetensors or model-*-of-*.safetensors (+ index)
  ``consolidated``  params.json + consolidated*.safetensors or consolidated.00.pth (Mistral's releases)
  ``orbax``         ours: config.json + params/ (an Orbax PyTree checkpoint); also a training run's
                    WORKDIR (its latest WORKDIR/checkpoints/STEP/params, config in WORKDIR/config.json)
                    or one of its step directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import uuid

CONFIG = "config.json"
PARAMS_DIR = "params"
TOKENIZER = "tokenizer.model"
EXPECTED = ("a Hugging Face directory (config.json + model*.safetensors), a Mistral consolidated directory "
            "(params.json + consolidated*.safetensors or consolidated.00.pth), or a mixtral-jax Orbax checkpoint "
            "(config.json + params/, or a training run's directory)")


@dataclasses.dataclass(frozen=True)
class Found:
  kind: str  # "hf" | "consolidated" | "orbax"
  directory: str  # the directory holding the weights
  config: str  # config.json or params.json
  params: str | None = None  # orbax: the PyTree checkpoint directory


def _steps(checkpoints: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(checkpoints)
                if d.isdigit() and os.path.isdir(os.path.join(checkpoints, d, PARAMS_DIR)))


def detect(path: str | os.PathLike) -> Found:
  """The format at ``path``; FileNotFoundError if absent, ValueError naming what was found otherwise."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  if os.path.isfile(path):
    raise ValueError(f"{path} is a file; give the checkpoint's directory ({EXPECTED})")
  has = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
  if has(os.path.join(PARAMS_DIR, "_METADATA")):
    for cfg in (os.path.join(path, CONFIG), os.path.join(path, os.pardir, os.pardir, CONFIG)):
      if os.path.exists(cfg):
        return Found("orbax", path, os.path.normpath(cfg), os.path.join(path, PARAMS_DIR))
    raise FileNotFoundError(f"{path} holds an Orbax params/ checkpoint but no {CONFIG} (looked in the directory "
                            "and, for a training step, in its run directory)")
  if has("checkpoints") and has(CONFIG) and os.path.isdir(os.path.join(path, "checkpoints")):
    steps = _steps(os.path.join(path, "checkpoints"))
    if steps:
      step = os.path.join(path, "checkpoints", str(steps[-1]))
      return Found("orbax", step, os.path.join(path, CONFIG), os.path.join(step, PARAMS_DIR))
  if has("params.json"):
    return Found("consolidated", path, os.path.join(path, "params.json"))
  if has(CONFIG) and glob.glob(os.path.join(path, "model*.safetensors")):
    return Found("hf", path, os.path.join(path, CONFIG))
  if has(CONFIG) and glob.glob(os.path.join(path, "pytorch_model*.bin")):
    raise ValueError(f"{path} holds pytorch_model*.bin weights; mixtral-jax reads safetensors only (re-save "
                     "with save_pretrained(..., safe_serialization=True))")
  entries = sorted(os.listdir(path))
  shown = ", ".join(entries[:10]) + (f", ... ({len(entries)} entries)" if len(entries) > 10 else "")
  raise ValueError(f"unknown checkpoint format at {path}: found [{shown or 'nothing'}]; expected {EXPECTED}")


def find_tokenizer(path: str | os.PathLike) -> str | None:
  """A ``tokenizer.model`` (Hugging Face layout) or a single ``tokenizer.model.v*`` (Mistral's
  consolidated layout) in the checkpoint directory or, for a training step, in its run directory."""
  path = os.path.abspath(os.fspath(path))
  for d in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    candidate = os.path.join(d, TOKENIZER)
    if os.path.isfile(candidate):
      return candidate
    versioned = sorted(glob.glob(os.path.join(glob.escape(d), TOKENIZER + ".v*")))
    if len(versioned) == 1:
      return versioned[0]
  return None


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, *, overwrite: bool = False):
  """Yields a temporary sibling of ``dst`` to write into; renames it to ``dst`` on success and removes
  it on any error, so ``dst`` is either complete or untouched. Refuses an existing ``dst`` unless
  ``overwrite``."""
  dst = os.path.abspath(os.fspath(dst))
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists; choose another destination or pass --overwrite")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.lexists(dst):
      old = os.path.join(parent, f".{os.path.basename(dst)}.old-{uuid.uuid4().hex[:8]}")
      os.rename(dst, old)
      os.rename(tmp, dst)
      if os.path.isdir(old):
        shutil.rmtree(old)
      else:
        os.remove(old)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
