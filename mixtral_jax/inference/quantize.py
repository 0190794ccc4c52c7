"""int8 weight-only quantization: per-output-channel symmetric scales, dequantised at the matmul.

For a weight W whose contraction ("input") axes are I and whose other axes index output channels c:

  s_c = max_{i in I} |W_ic| / 127        (float32; 1 where a channel is all zero)
  Q_ic = round(W_ic / s_c)               (int8 in [-127, 127])
  W_ic ~= Q_ic * s_c                     (error at most s_c / 2 per entry)

Quantized sites (every matmul weight of the decoder): attention q/k/v/o, the experts' w1/w3/w2, and
the LM head. The router (D x E, 0.001% of 8x7B) stays in its dtype, as GPTQ/AWQ Mixtral releases
keep the gate: a flipped expert choice costs more than its bytes save. The embedding is a gather,
not a matmul, and stays too.

A quantized module keeps ``name`` as an int8 ``nnx.Param`` (same shape and logical axes) and gains
``name + "_scale"`` (float32, the contracted axes kept with size 1 and logical axis None, so it
broadcasts against Q and shards with it). Each matmul site asks :func:`compute_weight` for its
operand, which is ``W.astype(dtype)`` for a plain weight and ``(Q * s).astype(dtype)`` for a quantized
one: inside the jitted step, so the int8 array is what lives in memory and the dequantised operand is
a transient that XLA fuses into the matmul's input on GPU/TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

SCALE = "_scale"
MODES = ("int8",)
QMAX = 127

# (path to the module from the model, parameter name, contracted axes counted from the end). Axes are
# counted from the end so the same entry serves the layer-stacked parameters (leading L axis).
SITES: tuple[tuple[tuple[str, ...], str, tuple[int, ...]], ...] = (
    (("blocks", "attn"), "q_DNH", (-3,)),
    (("blocks", "attn"), "k_DKH", (-3,)),
    (("blocks", "attn"), "v_DKH", (-3,)),
    (("blocks", "attn"), "o_NHD", (-3, -2)),
    (("blocks", "moe"), "w1_EDF", (-2,)),
    (("blocks", "moe"), "w3_EDF", (-2,)),
    (("blocks", "moe"), "w2_EFD", (-2,)),
    ((), "head_DV", (-2,)),
)


# our parameter's key in nnx.state(model, nnx.Param) -> its contracted axes (counted from the end)
SITE_AXES: dict[tuple[str, ...], tuple[int, ...]] = {path + (name,): axes for path, name, axes in SITES}


def compute_weight(module, name: str, dtype) -> jax.Array:
  """The matmul operand of parameter ``name`` of ``module`` in ``dtype``, dequantised if it is int8."""
  w = getattr(module, name)[...]
  scale = getattr(module, name + SCALE, None)
  if scale is None:
    return w.astype(dtype)
  return dequantize(w, scale[...], dtype)


def dequantize(q, scale, dtype) -> jax.Array:
  return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def as_compute(w, dtype) -> jax.Array:
  """An array, or a (int8 values, scale) pair as :func:`mixtral_jax.model.layer_views` gives for a
  quantized expert, as a matmul operand in ``dtype``."""
  if isinstance(w, tuple):
    return dequantize(w[0], w[1], dtype)
  return w.astype(dtype)


def quantize_array(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(int8 Q, float32 scale with ``axes`` kept at size 1): see the module docstring."""
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / QMAX, 1.0)
  q = jnp.clip(jnp.round(w32 / scale), -QMAX, QMAX).astype(jnp.int8)
  return q, scale


def is_quantized(model) -> bool:
  return hasattr(_module(model, SITES[0][0]), SITES[0][1] + SCALE)


def quantize(model, mode: str = "int8"):
  """Replaces every matmul weight of ``model`` (a :class:`mixtral_jax.model.Mixtral`) by int8 values and
  float32 per-output-channel scales, in place, one parameter at a time (the float original of each is
  freed before the next is quantized); returns the model. Keeps each parameter's sharding.

  Works under ``nnx.eval_shape`` too (no memory): ``nnx.eval_shape(lambda: quantize(Mixtral(cfg,
  rngs=nnx.Rngs(0))))`` is the abstract int8 model (see :func:`mixtral_jax.params.abstract_model`).
  """
  if mode not in MODES:
    raise ValueError(f"unknown quantization {mode!r}; supported: {', '.join(MODES)}")
  if is_quantized(model):
    raise ValueError("the model is already quantized")
  for path, name, axes in SITES:
    module = _module(model, path)
    var = getattr(module, name)
    logical = tuple(var.get_metadata().get("logical_axes", ()))
    q, scale = _quantize_jit(var[...], axes)
    ndim = q.ndim
    scale_axes = tuple(None if (i - ndim) in axes else a for i, a in enumerate(logical)) if logical else None
    meta = {"logical_axes": scale_axes} if scale_axes else {}
    setattr(module, name, nnx.Param(q, **({"logical_axes": logical} if logical else {})))
    setattr(module, name + SCALE, nnx.Param(scale, **meta))
  return model


_quantize_jit_fn = jax.jit(quantize_array, static_argnums=1)


def _quantize_jit(w, axes):
  """Traced under ``nnx.eval_shape``; otherwise one jitted call, which keeps the input's sharding (a
  contraction axis split over devices gets the reduction XLA inserts for the per-channel max)."""
  if isinstance(w, jax.core.Tracer):
    return quantize_array(w, axes)
  return _quantize_jit_fn(w, axes)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def quantize_into(w: jax.Array, axes: tuple[int, ...], q_sharding, scale_sharding) -> tuple[jax.Array, jax.Array]:
  """:func:`quantize_array` of ``w`` with its int8 values placed in ``q_sharding`` and its scales in
  ``scale_sharding`` (quantize-on-load: ``mixtral_jax.checkpoint.loading``). The same jitted arithmetic
  as :func:`quantize`, so a block gives the bits the whole parameter would; the reduction axes lie
  within one layer (and expert), so quantizing layer by layer equals quantizing the stack."""
  q, scale = quantize_array(w, axes)
  return (jax.lax.with_sharding_constraint(q, q_sharding),
          jax.lax.with_sharding_constraint(scale, scale_sharding))


def _module(model, path):
  m = model
  for p in path:
    m = getattr(m, p)
  return m


def weight_bytes(model) -> int:
  """Bytes of every parameter of ``model`` (quantized or not), from shapes and dtypes."""
  return sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
