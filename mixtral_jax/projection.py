"""One projection: a matmul weight in whatever form it is stored, plus its optional LoRA adapter.

``Attention.q = Projection("q", "btd,dnh->btnh")`` declares the projection on the module class;
``self.q(x_BTD, lora_key)`` then computes

  y = x W_operand + (drop(x) A) B * alpha/r

(or, serving a bank of adapters, ``mixtral_jax.lora.bank``, each batch row's own adapter's A and B)

where ``W_operand`` is the stored weight made a matmul operand by its storage form
(``mixtral_jax.quant``: float, int8 + scales, ...) and the second term is present when the module's
adapters (``lora_attr``, a ``mixtral_jax.lora.adapters.Adapters``) adapt this target.

Why a descriptor on the class, not a submodule: the weight keeps its place in the state tree
(``blocks.attn.q_DNH``, its scale ``q_DNH_scale``, its adapter ``blocks.attn.lora.q_A``), so Orbax
checkpoints written before this module, the checkpoint key maps and the expert-parallel code read the same
paths. The stored name, shape and logical axes come from the registry (``mixtral_jax.param_paths``).

The expert weights are not projections: their adapters live inside the expert kernels, where each
routed row draws its own dropout mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import param_paths, quant
from mixtral_jax.config import MixtralConfig
from mixtral_jax.layers import registry_param
from mixtral_jax.lora import adapters as lora


class Projection:
  """Declared on an ``nnx.Module`` class; ``module.<attr>`` is the :class:`BoundProjection` of that module.

  ``equation``: the einsum of input and weight. ``flatten``: contract the weight's ``contracted`` leading
  axes as one (``[N, H, D]`` as ``[N*H, D]``): a view of the stored weight, where the multi-axis einsum
  let XLA copy the weight into another axis order. ``lora_attr``: the module attribute holding its
  adapters."""

  def __init__(self, id_: str, equation: str, *, flatten: bool = False, lora_attr: str = "lora"):
    self.weight = param_paths.weight(id_)
    self.equation, self.flatten, self.lora_attr = equation, flatten, lora_attr

  def __get__(self, module, owner=None):
    if module is None:
      return self
    return BoundProjection(self, module)


class BoundProjection:
  """A projection of one module instance (made on attribute access; holds no state of its own)."""

  def __init__(self, spec: Projection, module: nnx.Module):
    self.spec, self.module = spec, module

  @property
  def name(self) -> str:
    """The stored weight's attribute on the module (``q_DNH``)."""
    return self.spec.weight.key[-1]

  def init(self, cfg: MixtralConfig, rngs: nnx.Rngs) -> None:
    """Creates the float weight on the module, N(0, initializer_range^2), with its logical axes."""
    setattr(self.module, self.name, registry_param(self.spec.weight.id, cfg, rngs))

  def operand(self, dtype) -> jax.Array:
    """The weight as a matmul operand in ``dtype`` (dequantised if stored quantized)."""
    return quant.operand(self.module, self.name, dtype)

  @property
  def adapters(self):
    return getattr(self.module, self.spec.lora_attr, None)

  def __call__(self, x, lora_key=None, dtype=None, adapter_B=None):
    """``x W`` by the projection's einsum in ``dtype`` (default: x's), plus the LoRA term if adapted.
    ``adapter_B``: each batch row's adapter in a serving bank (``lora.add``)."""
    w = self.operand(jnp.dtype(dtype or x.dtype))
    if self.spec.flatten:
      n_in = self.spec.weight.contracted
      x_in = x.reshape(*x.shape[:-n_in], math.prod(x.shape[-n_in:]))
      y = jnp.einsum(self.spec.equation, x_in, w.reshape(math.prod(w.shape[:n_in]), *w.shape[n_in:]))
    else:
      y = jnp.einsum(self.spec.equation, x, w)
    return lora.add(self.adapters, self.spec.weight.id, x, y, lora_key, adapter_B)

  def head_operands(self, h, w, lora_key=None, adapter_B=None):
    """(h, W) with the adapter folded into one matmul's operands (``lora.head_operands``): for the fused
    cross-entropy, which takes the head as operands rather than calling it."""
    return lora.head_operands(self.adapters, h, w, lora_key, adapter_B)
