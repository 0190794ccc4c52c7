"""int8 weight-only quantization of a whole model: per-output-channel symmetric scales, dequantised at the
matmul. The storage form and its maths live with the model (``mixtral_jax.quant``); this module turns a
float model into a quantized one.

Quantized sites (``mixtral_jax.param_paths`` rows with ``quantize=True``): attention q/k/v/o, the
experts' w1/w3/w2, and the LM head. The router (D x E, 0.001% of 8x7B) stays in its dtype, as GPTQ/AWQ
Mixtral releases keep the gate: a flipped expert choice costs more than its bytes save. The embedding is
a gather, not a matmul, and stays too.

A quantized module keeps ``name`` as an int8 ``nnx.Param`` (same shape and logical axes) and gains
``name + "_scale"`` (float32, the contracted axes kept with size 1 and logical axis None, so it
broadcasts against Q and shards with it).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from mixtral_jax import param_paths, quant
from mixtral_jax.quant import QMAX, SCALE, as_compute, dequantize, quantize_array  # noqa: F401 (public here too)

MODES = tuple(quant.FORMS)

# our parameter's key in nnx.state(model, nnx.Param) -> its contracted axes (counted from the end, so the
# same entry serves the layer-stacked parameters)
SITE_AXES: dict[tuple[str, ...], tuple[int, ...]] = param_paths.quant_sites()
# (path to the module from the model, parameter name, contracted axes)
SITES: tuple[tuple[tuple[str, ...], str, tuple[int, ...]], ...] = tuple(
    (key[:-1], key[-1], axes) for key, axes in SITE_AXES.items())


def site_axes(mode: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  """The sites ``mode`` quantizes (every matmul weight for int8; nf4 leaves the LM head in float)."""
  skip = set(getattr(quant.FORMS[mode], "skip", ()))
  return {key: axes for key, axes in SITE_AXES.items() if key not in skip}


def compute_weight(module, name: str, dtype) -> jax.Array:
  """The matmul operand of parameter ``name`` of ``module`` in ``dtype``, dequantised if it is int8."""
  return quant.operand(module, name, dtype)


def is_quantized(model) -> bool:
  path, name, _ = SITES[0]
  return quant.form_of(_module(model, path), name) is not quant.FLOAT


def quantize(model, mode: str = "int8"):
  """Replaces every matmul weight of ``model`` (a :class:`mixtral_jax.model.Mixtral`) by int8 values and
  float32 per-output-channel scales (``mode="nf4"``: attention and expert weights by nf4 codes and block
  scales), in place, one parameter at a time (the float original of each is
  freed before the next is quantized); returns the model. Keeps each parameter's sharding.

  Works under ``nnx.eval_shape`` too (no memory): ``nnx.eval_shape(lambda: quantize(Mixtral(cfg,
  rngs=nnx.Rngs(0))))`` is the abstract int8 model (see :func:`mixtral_jax.params.abstract_model`).
  """
  if mode not in MODES:
    raise ValueError(f"unknown quantization {mode!r}; supported: {', '.join(MODES)}")
  if is_quantized(model):
    raise ValueError("the model is already quantized")
  for key, axes in site_axes(mode).items():
    path, name = key[:-1], key[-1]
    module = _module(model, path)
    var = getattr(module, name)
    logical = tuple(var.get_metadata().get("logical_axes", ()))
    q, extras = _quantize_jit(var[...], axes, mode)
    extra_axes = quant.FORMS[mode].extra_axes(logical, axes) if logical else {}
    setattr(module, name, nnx.Param(q, **({"logical_axes": logical} if logical else {})))
    for suffix, value in extras.items():
      setattr(module, name + suffix, nnx.Param(value, **({"logical_axes": extra_axes[suffix]} if logical else {})))
  return model


def _quantize_form(w, axes, mode):
  return quant.FORMS[mode].quantize(w, axes)


_quantize_jit_fn = jax.jit(_quantize_form, static_argnums=(1, 2))


def _quantize_jit(w, axes, mode):
  """Traced under ``nnx.eval_shape``; otherwise one jitted call, which keeps the input's sharding (a
  contraction axis split over devices gets the reduction XLA inserts for the per-channel max)."""
  if isinstance(w, jax.core.Tracer):
    return _quantize_form(w, axes, mode)
  return _quantize_jit_fn(w, axes, mode)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def quantize_into(w: jax.Array, axes: tuple[int, ...], q_sharding, scale_sharding) -> tuple[jax.Array, jax.Array]:
  """:func:`quantize_array` of ``w`` with its int8 values placed in ``q_sharding`` and its scales in
  ``scale_sharding`` (quantize-on-load: ``mixtral_jax.checkpoint.loading``). The same jitted arithmetic
  as :func:`quantize`, so a block gives the bits the whole parameter would; the reduction axes lie
  within one layer (and expert), so quantizing layer by layer equals quantizing the stack."""
  q, scale = quantize_array(w, axes)
  return (jax.lax.with_sharding_constraint(q, q_sharding),
          jax.lax.with_sharding_constraint(scale, scale_sharding))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def quantize_form_into(w: jax.Array, axes: tuple[int, ...], mode: str, q_sharding, extra_shardings: tuple
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The form ``mode``'s quantization of ``w``, its values placed in ``q_sharding`` and its sibling leaves
  (in the form's ``suffixes`` order) in ``extra_shardings``: :func:`quantize_into` for any form."""
  form = quant.FORMS[mode]
  q, extras = form.quantize(w, axes)
  return (jax.lax.with_sharding_constraint(q, q_sharding),
          {s: jax.lax.with_sharding_constraint(extras[s], sh) for s, sh in zip(form.suffixes, extra_shardings)})


def _module(model, path):
  m = model
  for p in path:
    m = getattr(m, p)
  return m


def weight_bytes(model) -> int:
  """Bytes of every parameter of ``model`` (quantized or not), from shapes and dtypes."""
  return sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
