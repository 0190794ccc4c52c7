"""Small building blocks: parameters with logical axis names, RMSNorm, rotary embeddings.

Every parameter carries ``logical_axes`` metadata (one name per dimension, looked up in
``sharding.rules.LOGICAL_RULES``); the layer stack's ``nnx.vmap`` prepends ``"layers"``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import param_paths
from mixtral_jax.config import MixtralConfig

LOGICAL_AXES = "logical_axes"  # Variable metadata key holding the logical axis names


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str], dtype, *, std: float | None = None,
          ones: bool = False) -> nnx.Param:
  """A parameter initialised N(0, std^2) (Hugging Face's init) or to ones, tagged with logical axes."""
  assert len(shape) == len(axes), (shape, axes)
  if ones:
    value = jnp.ones(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, **{LOGICAL_AXES: tuple(axes)})


def registry_param(id_: str, cfg: MixtralConfig, rngs: nnx.Rngs) -> nnx.Param:
  """Weight ``id_`` of :mod:`mixtral_jax.param_paths` (its per-layer shape and logical axes), in the
  parameter dtype, initialised N(0, initializer_range^2)."""
  w = param_paths.weight(id_)
  return param(rngs, param_paths.shape(w, cfg), w.axes, jnp.dtype(cfg.param_dtype), std=cfg.initializer_range)


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) * scale, the statistics in float32 (as transformers does), then the
  normalised value cast back to the input dtype before the scale."""
  x32 = x_BTD.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale_D.astype(x_BTD.dtype) * (x32 * inv).astype(x_BTD.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype):
    self.scale = param(None, (dim,), ("norm",), param_dtype, ones=True)
    self.eps = eps

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return rms_norm(x_BTD, self.scale[...], self.eps)


def rope_cos_sin(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [B, T, H] for the half-split ("rotate_half") RoPE layout of Hugging Face weights.

  inv_freq_i = theta^(-2i/H) for i < H/2; angle = position * inv_freq, repeated for both halves.
  Mistral's original (consolidated) files use the interleaved layout; conversion permutes q/k rows.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
  return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin, with rotate_half([a, b]) = [-b, a] over the two halves of H."""
  half = x_BTNH.shape[-1] // 2
  x1, x2 = x_BTNH[..., :half], x_BTNH[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos_BTH[:, :, None, :].astype(x_BTNH.dtype)
  sin = sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
  return x_BTNH * cos + rotated * sin
