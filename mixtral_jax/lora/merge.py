"""Adapters as factors in our layout, from a LoRA run or a PEFT directory, and merged into base weights.

A :class:`Factors` is one target's adapter over every layer: A ``[L, (E,) in..., r]``, B
``[L, (E,) r, out...]`` (no L for the LM head) and a scale; the merged weight is
``W + A B * scale`` per layer (and expert). Merging is how adapters serve inference: a model loaded with
``adapter=`` runs exactly the base model's program on merged weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import MixtralConfig

from . import adapters as adapters_lib
from . import run as run_lib

# target -> our base parameter's key in nnx.state(model, nnx.Param)
PARAM_KEYS = {"q": ("blocks", "attn", "q_DNH"), "k": ("blocks", "attn", "k_DKH"), "v": ("blocks", "attn", "v_DKH"),
              "o": ("blocks", "attn", "o_NHD"), "router": ("blocks", "moe", "router_DE"),
              "w1": ("blocks", "moe", "w1_EDF"), "w3": ("blocks", "moe", "w3_EDF"), "w2": ("blocks", "moe", "w2_EFD"),
              "lm_head": ("head_DV",)}
_MODULE = {t: ("blocks", "attn", "lora") for t in ("q", "k", "v", "o")} | {
    t: ("blocks", "moe", "lora") for t in ("router", "w1", "w2", "w3")} | {"lm_head": ("lora_head",)}


@dataclasses.dataclass
class Factors:
  target: str
  A: np.ndarray
  B: np.ndarray
  scale: float

  @property
  def lead(self) -> int:
    """Leading axes that enumerate separate adapters (layers, experts)."""
    return (self.target != "lm_head") + adapters_lib.is_expert(self.target)

  def delta(self) -> np.ndarray:
    """A B * scale, shaped like the base parameter (float32)."""
    lead_shape = self.A.shape[:self.lead]
    out = None
    for idx in itertools.product(*(range(n) for n in lead_shape)):
      d = np.tensordot(self.A[idx].astype(np.float32), self.B[idx].astype(np.float32), axes=1)
      if out is None:
        out = np.empty(lead_shape + d.shape, np.float32)
      out[idx] = d
    return out * np.float32(self.scale)


def adapter_key(target: str, factor: str) -> tuple[str, ...]:
  """Where a target's factor lives in the adapters tree (``factor`` is "A" or "B")."""
  return _MODULE[target] + (f"{target}_{factor}",)


def from_tree(flat: dict[tuple[str, ...], np.ndarray], scale: float) -> list[Factors]:
  """Factors from our adapters tree (flattened {path: array}, e.g. a run's checkpoint)."""
  out = []
  for target in adapters_lib._LAYOUT:
    a, b = adapter_key(target, "A"), adapter_key(target, "B")
    if a in flat:
      out.append(Factors(target, np.asarray(flat[a]), np.asarray(flat[b]), scale))
  return out


def check_shapes(factors: list[Factors], cfg: MixtralConfig, where: str) -> None:
  """Each factor's shape against the base config (any rank); ValueError naming the first mismatch."""
  L = cfg.num_hidden_layers
  for f in factors:
    r = f.A.shape[-1]
    want_a, want_b = adapters_lib.shapes(cfg, f.target, r)
    if f.target != "lm_head":
      want_a, want_b = (L,) + want_a, (L,) + want_b
    if f.A.shape != want_a or f.B.shape != want_b:
      raise ValueError(
          f"{where}: the {f.target} adapter has factors {list(f.A.shape)} x {list(f.B.shape)}, but this base "
          f"needs {list(want_a)} x {list(want_b)} (hidden_size={cfg.hidden_size}, intermediate_size="
          f"{cfg.intermediate_size}, layers={L}, experts={cfg.num_local_experts}, vocab={cfg.vocab_size}); the "
          "adapter was made for another base model")


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
    from .peft_io import read_peft  # noqa: PLC0415

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
