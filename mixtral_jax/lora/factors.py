"""One adapter as a pair of factors, in our layout: the data type that merging and PEFT I/O share.

A :class:`Factors` is one target's adapter over every layer: A ``[L, (E,) in..., r]``, B
``[L, (E,) r, out...]`` (no L for the LM head) and a scale; the delta it adds is ``A B * scale`` per
layer (and expert). ``merge`` adds it to base weights, ``peft_io`` reads and writes it in Hugging Face
PEFT form; both import this module and neither imports the other's internals, so the two are no circle.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from mixtral_jax import param_paths
from mixtral_jax.config import MixtralConfig

from . import adapters as adapters_lib

# target -> our base parameter's key in nnx.state(model, nnx.Param)
# target -> the key of the parameter it adapts, from the one registry (``mixtral_jax.param_paths``)
PARAM_KEYS = param_paths.lora_keys()


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
    """A B * scale, shaped like the base parameter (float32): one tensordot per layer (and expert)."""
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
  return adapters_lib.adapter_key(target, factor)


def from_tree(flat: dict[tuple[str, ...], np.ndarray], scale: float) -> list[Factors]:
  """Factors from our adapters tree (flattened {path: array}, e.g. a run's checkpoint), in target order."""
  out = []
  for target in PARAM_KEYS:
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
