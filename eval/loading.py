"""What every evaluation starts with: the model on its mesh, its tokenizer, and an output folder."""

from __future__ import annotations

import os
import shutil

import jax


def load_model(model, *, tokenizer=None, mesh=None, dtype=None):
  """(model, Tokenizer, Mesh or None) from a checkpoint path or a ``Mixtral`` already in memory.

  The tokenizer is ``tokenizer`` (a Tokenizer, a path, 'v1'/'v3'), else the checkpoint's
  ``tokenizer.model``, else the bundled file whose vocabulary size matches the model's."""
  import mixtral_jax  # noqa: PLC0415
  from mixtral_jax.checkpoint import find_tokenizer  # noqa: PLC0415
  from mixtral_jax.tokenizer import BUNDLED_VOCAB, Tokenizer  # noqa: PLC0415

  path = None
  if isinstance(model, (str, os.PathLike)):
    path = os.fspath(model)
    if not os.path.exists(path):
      raise FileNotFoundError(f"model path {path} does not exist; pass a checkpoint directory or a training run")
    mesh_obj = _mesh(mesh, mixtral_jax.checkpoint.load_config(path).num_local_experts)
    model = mixtral_jax.from_pretrained(path, mesh=mesh_obj, dtype=dtype)
  else:
    mesh_obj = _mesh(mesh, model.cfg.num_local_experts)
    if mesh_obj is not None:
      from mixtral_jax.inference.placement import place  # noqa: PLC0415
      from flax import nnx  # noqa: PLC0415
      graphdef, state = nnx.split(model)
      model = nnx.merge(graphdef, place(state, mesh_obj))
  if not isinstance(tokenizer, Tokenizer):
    vocab = model.cfg.vocab_size
    name = tokenizer or (find_tokenizer(path) if path else None) or BUNDLED_VOCAB.get(vocab)
    if name is None:
      raise ValueError(f"no tokenizer.model next to the model and no bundled tokenizer has {vocab} tokens; "
                       "pass --tokenizer PATH")
    tokenizer = Tokenizer.load(name)
  tokenizer.check_vocab(model.cfg.vocab_size)
  return model, tokenizer, mesh_obj


def _mesh(mesh, num_experts: int):
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  from mixtral_jax.sharding.mesh import make_mesh  # noqa: PLC0415
  return make_mesh(mesh, num_experts=num_experts)


def prepare_out(out: str | os.PathLike, overwrite: bool) -> str:
  """Creates the output folder; an existing non-empty one is refused unless ``overwrite``."""
  out = os.fspath(out)
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise FileExistsError(f"output path {out} exists and is not a folder; choose another --out")
    if os.listdir(out):
      if not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --out")
      shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)
  return out


def parse_floats(text: str, what: str) -> list[float]:
  try:
    return [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"cannot read {what} {text!r}; write comma-separated numbers such as 0,0.5,1") from None
