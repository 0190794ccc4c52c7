"""Bucketed expert FFN on a quantized (int8 / nf4) frozen base, dequantized one expert at a time.

``dense_expert_ffn`` multiplies every bucket by its expert's stacked weights ``[E, D, F]`` at once, so a
quantized layer would first be turned into a float copy of all E experts: for 8x7B, 3 x 8 x 4096 x
14336 bf16 values (2.6 GiB, more with the float32 lookup in between) per layer, live through the
layer's forward and again through its recomputed backward. QLoRA's memory depends on never holding it.

Algorithm, for each expert e in turn (a ``lax.scan`` over E):

  1. W1_e, W3_e, W2_e = dequantize(stored[e])            (``quant.as_compute``: bnb-exact for nf4)
  2. h = silu(x_e W1_e + lora) * (x_e W3_e + lora);  y_e = h W2_e + lora    (as ``dense_expert_ffn``)

Steps 1-2 run under ``jax.checkpoint`` with nothing saved: the backward re-dequantizes expert e from the
stored arrays (which live anyway, as parameters) and recomputes its products, instead of keeping its
float weights, so at most one expert's float weights (3 x 4096 x 14336 bf16 = 336 MiB for 8x7B) exist
at a time, forward or backward.
The base is frozen: its stored values are integers, and no gradient of them or of their scales is formed
unless a caller differentiates them. The result equals ``dense_expert_ffn`` on the whole dequantized
layer (same products, expert by expert).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax.expert_adapters import ExpertLoRA, project
from mixtral_jax.quant import as_compute


def is_stored_quantized(w) -> bool:
  """True for a quantized weight in ``quant.stored`` form: ``(values, {suffix: sibling array})``."""
  return isinstance(w, tuple)


def num_experts(w) -> int:
  return (w[0] if is_stored_quantized(w) else w).shape[0]


def expert_slice(w, e):
  """Expert ``e`` (static or traced) of a stacked ``[E, ...]`` weight, float or quantized (values and
  every sibling cut)."""
  pick = lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False)  # noqa: E731
  if is_stored_quantized(w):
    values, extras = w
    return pick(values), {k: pick(v) for k, v in extras.items()}
  return pick(w)


# Nothing saved: saving the products too (dots_saveable) compiled to 41.00 GiB for 8x7B nf4 4 x 4096 on
# one H100, over the 40 GiB target, against 36.59 GiB this way (docs/qlora.md); the price is one more
# forward of the expert matmuls in the backward.
@functools.partial(jax.checkpoint, static_argnums=(0,), policy=jax.checkpoint_policies.nothing_saveable)
def _one_expert(dtype, e, x_CD, w1, w3, w2, lo: ExpertLoRA | None, rows_C):
  """Expert ``e``'s FFN on its bucket, its weights dequantized here (and again in the backward)."""
  w1_DF, w3_DF, w2_FD = (as_compute(expert_slice(w, e), dtype) for w in (w1, w3, w2))
  a1_CF = project(lo, "w1", x_CD, x_CD @ w1_DF, rows_C)  # gate projection
  a3_CF = project(lo, "w3", x_CD, x_CD @ w3_DF, rows_C)  # up projection
  h_CF = jax.nn.silu(a1_CF) * a3_CF
  return project(lo, "w2", h_CF, h_CF @ w2_FD, rows_C)  # down projection


def dense_expert_ffn_dequant(x_ECD: jax.Array, w1_EDF, w3_EDF, w2_EFD, lora: ExpertLoRA | None = None,
                             rows_EC=None) -> jax.Array:
  """``dense_expert_ffn`` with weights in ``quant.stored`` form (module docstring); ``[E, C, D]`` in x's
  dtype, which is also the dequantization's. A ``lax.scan`` over the experts: a loop, so XLA cannot start
  expert e + 1's dequantization before expert e is done; the stored weights are the loop's constants
  (sliced inside, never copied per step), so the backward saves only each expert's counter."""
  E = x_ECD.shape[0]
  dtype = jnp.dtype(x_ECD.dtype)

  def body(carry, xs):
    e, x_CD, rows_C = xs
    lo = None if lora is None else lora.expert(e)
    return carry, _one_expert(dtype, e, x_CD, w1_EDF, w3_EDF, w2_EFD, lo, rows_C)

  _, y_ECD = jax.lax.scan(body, None, (jnp.arange(E), x_ECD, rows_EC))
  return y_ECD
