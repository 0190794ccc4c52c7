"""Parameter counting and placement, from the abstract module (``nnx.eval_shape``): no allocation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import MixtralConfig
from mixtral_jax.layers import LOGICAL_AXES
from mixtral_jax.model import Mixtral
from mixtral_jax.sharding.rules import logical_sharding


def abstract_model(cfg: MixtralConfig, quantize: str | None = None) -> Mixtral:
  """The model with ``ShapeDtypeStruct`` leaves: shapes, dtypes and logical axes, no memory.
  ``quantize="int8"``: as :func:`mixtral_jax.inference.quantize.quantize` leaves it (int8 weights plus
  float32 scales)."""
  if quantize is None:
    return nnx.eval_shape(lambda: Mixtral(cfg, rngs=nnx.Rngs(0)))
  from mixtral_jax.inference.quantize import quantize as quantize_model  # noqa: PLC0415
  return nnx.eval_shape(lambda: quantize_model(Mixtral(cfg, rngs=nnx.Rngs(0)), quantize))


def _variables(model: Mixtral):
  _, state = nnx.split(model, nnx.Param)
  return [v for _, v in nnx.to_flat_state(state)]


def param_counts(cfg: MixtralConfig) -> tuple[int, int]:
  """(total, active per token). Active counts a routed expert tensor at k/E of its size: each token
  runs k of the E experts of every layer; everything else (attention, norms, router, embeddings, head)
  is used by every token."""
  total = active = 0
  k, E = cfg.num_experts_per_tok, cfg.num_local_experts
  for var in _variables(abstract_model(cfg)):
    n = math.prod(var.shape)
    total += n
    active += n * k // E if "experts" in var.get_metadata()[LOGICAL_AXES] else n
  return total, active


def param_shardings(model_or_state, mesh: jax.sharding.Mesh):
  """A tree of ``NamedSharding`` matching ``nnx.state(model)``, from each parameter's logical axes."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

  def one(var):
    return var.replace(logical_sharding(var.get_metadata()[LOGICAL_AXES], mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_model(cfg: MixtralConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | str | None = None) -> Mixtral:
  """A randomly initialised model. With a mesh (a ``Mesh`` or a spec such as ``"data=2,expert=4"``),
  every parameter is created directly in its shards (one jitted init with ``out_shardings``), so no
  device ever holds the whole model."""
  if mesh is None:
    return Mixtral(cfg, rngs=nnx.Rngs(seed))
  if not isinstance(mesh, jax.sharding.Mesh):
    from mixtral_jax.sharding.mesh import make_mesh  # noqa: PLC0415

    mesh = make_mesh(mesh, num_experts=cfg.num_local_experts)
  abstract = abstract_model(cfg)
  graphdef, abs_state = nnx.split(abstract)
  shardings = param_shardings(abs_state, mesh)

  @jax.jit
  def init():
    return nnx.state(Mixtral(cfg, rngs=nnx.Rngs(seed)))

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
