"""Where generation runs: the mesh (a ``Mesh`` or a spec such as ``"expert=4"``), the parameters
placed on it, and, on a single CPU device, the zero-copy per-layer per-expert weight views that the
decode step reads (``mixtral_jax.model.layer_views``: XLA:CPU copies any slice of an array before a
matmul reads it, and those copies cost as much as the matmuls)."""

from __future__ import annotations

import contextlib

import jax
from flax import nnx


def resolve_mesh(mesh, cfg):
  """``mesh`` as a ``jax.sharding.Mesh`` (a spec string is built for ``cfg``'s experts), or None."""
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  from mixtral_jax.sharding.mesh import make_mesh  # noqa: PLC0415
  return make_mesh(mesh, num_experts=cfg.num_local_experts)


def place(state, mesh):
  """Shards parameters by their logical axes unless they already live on ``mesh``'s devices."""
  from mixtral_jax.params import param_shardings  # noqa: PLC0415  (params imports the model)
  shardings = param_shardings(state, mesh)
  return jax.tree.map(
      lambda x, s: x if getattr(x, "sharding", None) == s else jax.device_put(x, s), state, shardings)


def mesh_context(mesh):
  """``jax.set_mesh(mesh)``, or nothing without a mesh."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def decode_views(model, mesh):
  """Zero-copy per-layer, per-expert weight arrays for the decode step on a single CPU device (see
  :func:`mixtral_jax.model.layer_views`), else None (the scanned stack)."""
  from mixtral_jax.model import layer_views  # noqa: PLC0415
  if mesh is not None:
    return None
  devices = {d for a in jax.tree.leaves(nnx.state(model.blocks)) for d in a.devices()}
  if len(devices) != 1 or next(iter(devices)).platform != "cpu":
    return None
  return layer_views(model)
