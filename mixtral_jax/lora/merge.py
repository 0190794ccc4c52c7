"""Adapters as factors in our layout, from a LoRA run or a PEFT directory, and merged into base weights.

The factors themselves (:class:`Factors`, their keys and shape checks) live in ``lora.factors``, which
this module and ``peft_io`` both import; the names are re-exported here for callers. The merged weight
is ``W + A B * scale`` per layer (and expert). Merging is how adapters serve inference: a model loaded with
``adapter=`` runs exactly the base model's program on merged weights.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import MixtralConfig

from . import adapters as adapters_lib
from . import run as run_lib
from .factors import PARAM_KEYS, Factors, adapter_key, check_shapes, from_tree
from .peft_io import read_peft

__all__ = ["PARAM_KEYS", "Factors", "adapter_key", "check_shapes", "from_tree", "load_factors", "merge_arrays",
           "merge_into", "attach", "adapter_values"]


def load_factors(adapter: str | os.PathLike, cfg: MixtralConfig) -> list[Factors]:
  """Factors from a PEFT adapter directory or a mixtral-jax LoRA run, checked against the base ``cfg``."""
  adapter = os.fspath(adapter)
  if not os.path.exists(adapter):
    raise FileNotFoundError(f"adapter {adapter} does not exist")
  if run_lib.is_lora_run(adapter):
    rec = run_lib.read(adapter)
    run_lib.check_base(rec, cfg, adapter, "the base being loaded")
    _, flat = run_lib.latest_adapters(adapter)
    factors = from_tree(flat, run_lib.section(rec).scale)
  else:
    factors = read_peft(adapter, cfg)
  check_shapes(factors, cfg, adapter)
  return factors


def merge_arrays(arrays: dict[tuple[str, ...], jax.Array], factors: list[Factors]) -> dict:
  """``arrays`` (our parameters by key, any placement) with each adapter merged: W + A B * scale, summed in
  float32, stored in W's dtype and sharding."""
  out = dict(arrays)
  for f in factors:
    key = PARAM_KEYS[f.target]
    w = out[key]
    add = jax.jit(lambda w, d: (w.astype(jnp.float32) + d).astype(w.dtype), out_shardings=w.sharding)
    out[key] = add(w, f.delta())
  return out


def merge_into(model, factors: list[Factors]):
  """A model (``mixtral_jax.Mixtral``) whose parameters have ``factors`` merged in (a new model)."""
  from flax import nnx  # noqa: PLC0415

  graphdef, state = nnx.split(model)
  flat = {tuple(str(p) for p in path): v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  from mixtral_jax.checkpoint.orbax_io import unflatten  # noqa: PLC0415

  nnx.replace_by_pure_dict(state, unflatten(merge_arrays(flat, factors)))
  return nnx.merge(graphdef, state)


def attach(model, lora, values: dict | None = None, *, seed: int = 0):
  """A LoRA model (adapters per ``lora``, a ``LoraSection``) on ``model``'s weights, which it shares.
  ``values``: the adapters' pure-dict tree (e.g. a run's); default: ``init_values(seed)`` (B = 0, so
  the result computes exactly what ``model`` does)."""
  from flax import nnx  # noqa: PLC0415

  from mixtral_jax.model import Mixtral  # noqa: PLC0415

  abstract = nnx.eval_shape(lambda: Mixtral(model.cfg, rngs=nnx.Rngs(0), lora_cfg=lora))
  graphdef, adapters, base = nnx.split(abstract, adapters_lib.LoRAParam, ...)
  if values is None:
    values = adapters_lib.init_values(adapters.to_pure_dict(), seed)
  nnx.replace_by_pure_dict(adapters, values)
  nnx.replace_by_pure_dict(base, nnx.state(model, nnx.Param).to_pure_dict())
  return nnx.merge(graphdef, adapters, base)


def adapter_values(model) -> dict:
  """The pure-dict tree of a LoRA model's adapters."""
  from flax import nnx  # noqa: PLC0415

  return nnx.state(model, adapters_lib.LoRAParam).to_pure_dict()
