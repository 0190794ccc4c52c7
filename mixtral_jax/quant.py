"""How a matmul weight is stored, and how it becomes a matmul operand: the storage forms.

A weight ``name`` of a module is stored in one form:

  - float: the ``nnx.Param`` ``name`` itself, in the parameter dtype;
  - int8: ``name`` holds int8 values Q and ``name + "_scale"`` float32 per-output-channel scales s
    (the contracted axes kept with size 1), W ~= Q * s;
  - nf4: ``name`` holds packed 4-bit codes and ``name + "_absmax"`` float32 block scales
    (:mod:`mixtral_jax.quant_nf4`, bit-compatible with bitsandbytes).

A form is a small class: the sibling leaves it adds (``suffixes``), how it quantizes a float array
(:meth:`Int8.quantize`) and how its leaves give the operand (:meth:`Int8.operand`). The form of a stored
weight is read off its siblings (:func:`form_of`), so the state tree alone says what a checkpoint holds.
Adding 4-bit nf4 with block scales is one more class registered in :data:`FORMS`.

The maths of int8 (symmetric, per output channel c, contracted axes I):

  s_c = max_{i in I} |W_ic| / 127        (float32; 1 where a channel is all zero)
  Q_ic = round(W_ic / s_c)               (int8 in [-127, 127])
  W_ic ~= Q_ic * s_c                     (error at most s_c / 2 per entry)

The operand is formed inside the jitted step, so the stored array is what lives in memory and the
dequantised operand is a transient that XLA fuses into the matmul's input on GPU/TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.quant_nf4 import Nf4

SCALE = "_scale"
QMAX = 127


class Float:
  """A plain weight: the operand is the weight cast to the compute dtype."""
  suffixes: tuple[str, ...] = ()

  def operand(self, w, extras: dict, dtype) -> jax.Array:
    del extras
    return w.astype(dtype)


class Int8:
  """int8 values with float32 per-output-channel scales (leaf ``name + "_scale"``)."""
  suffixes: tuple[str, ...] = (SCALE,)

  def operand(self, q, extras: dict, dtype) -> jax.Array:
    return dequantize(q, extras[SCALE], dtype)

  def quantize(self, w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, dict[str, jax.Array]]:
    q, scale = quantize_array(w, axes)
    return q, {SCALE: scale}

  def extra_axes(self, logical: tuple, axes: tuple[int, ...]) -> dict[str, tuple]:
    """Logical axes of each sibling leaf: the weight's, with the contracted ``axes`` (size 1) unsharded."""
    ndim = len(logical)
    return {SCALE: tuple(None if (i - ndim) in axes else a for i, a in enumerate(logical))}


FLOAT = Float()
# quantization mode -> form. nf4 (``mixtral_jax.quant_nf4``: bitsandbytes' 4-bit NormalFloat, blocks of 64)
# covers attention and the experts only (its ``skip``): QLoRA and bitsandbytes keep the LM head in float.
FORMS = {"int8": Int8(), "nf4": Nf4()}


def form_of(module, name: str):
  """The storage form of weight ``name`` of ``module``: the quantized form whose sibling leaves exist."""
  for form in FORMS.values():
    if all(hasattr(module, name + s) for s in form.suffixes):
      return form
  return FLOAT


def operand(module, name: str, dtype) -> jax.Array:
  """The matmul operand of weight ``name`` of ``module`` in ``dtype``, dequantised if it is stored quantized."""
  form = form_of(module, name)
  extras = {s: getattr(module, name + s)[...] for s in form.suffixes}
  return form.operand(getattr(module, name)[...], extras, dtype)


def stored_weight(module, name: str):
  """Weight ``name`` of ``module`` as :func:`as_compute` takes it, not yet dequantized: the array itself
  when float, else (values, {suffix: sibling array}) of its quantized form."""
  form = form_of(module, name)
  values = getattr(module, name)[...]
  return values if form is FLOAT else (values, {s: getattr(module, name + s)[...] for s in form.suffixes})


def dequantize(q, scale, dtype) -> jax.Array:
  return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def stored(module_state, name: str):
  """Weight ``name`` of a module's state (a mapping of leaves) as :func:`as_compute` takes it: the array
  itself when float, else (values, {suffix: sibling array}) of its quantized form."""
  for form in FORMS.values():
    if all(name + s in module_state for s in form.suffixes):
      return module_state[name][...], {s: module_state[name + s][...] for s in form.suffixes}
  return module_state[name][...]


def as_compute(w, dtype) -> jax.Array:
  """An array, or a (values, {suffix: array}) pair of a quantized form (:func:`stored`, cut per expert by
  :func:`mixtral_jax.model.layer_views`), as a matmul operand in ``dtype``."""
  if isinstance(w, tuple):
    values, extras = w
    form = next(f for f in FORMS.values() if set(f.suffixes) == set(extras))
    return form.operand(values, extras, dtype)
  return w.astype(dtype)


def quantize_array(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(int8 Q, float32 scale with ``axes`` kept at size 1): see the module docstring."""
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / QMAX, 1.0)
  q = jnp.clip(jnp.round(w32 / scale), -QMAX, QMAX).astype(jnp.int8)
  return q, scale
