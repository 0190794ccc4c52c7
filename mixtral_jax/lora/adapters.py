"""The adapter parameters inside the model, and how the forward pass applies them.

Adapters are ``LoRAParam`` variables (not ``nnx.Param``), so ``nnx.state(model, nnx.Param)`` is still
exactly the base model: checkpoints, export and parameter counts never see them. Each adapted module
holds one :class:`Adapters` (or ``None``); the layer stack's ``nnx.vmap`` gives every adapter a leading
``layers`` axis like the weights it adapts, and the expert adapters carry the ``experts`` axis, so they
are sharded with their expert.

Two ways of applying an adapter, both exact in real arithmetic:

* :func:`add` (attention, router): ``y + (x A) B * alpha/r``, two thin matmuls beside the base one;
* :func:`adapted` (expert weights, LM head): the weight ``W + A B * alpha/r`` formed once per layer and
  step on the devices that hold that expert (A, B and W share the expert sharding, so forming it needs
  no communication), then used by whatever dispatch runs: dropless, selected, blocked, dense, capacity
  or the expert-parallel ``shard_map``. It costs E*D*F*r*2 FLOPs per expert weight and layer (for 8x7B
  r=16, 2.2% of one 8192-token sequence's expert FLOPs) and one transient weight-sized buffer. The
  gradient of W itself is never formed for the optimizer: only A and B are differentiated.

Adapters are created zero-valued (so building the model consumes no random numbers and a LoRA model's
base weights equal the plain model's for the same seed); :func:`init_values` gives the training start:
A uniform in +-1/sqrt(in) (PEFT's default), B zero, so step 0 is the base model.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import MixtralConfig
from mixtral_jax.layers import LOGICAL_AXES

from .spec import LoraSection


class LoRAParam(nnx.Variable):
  """A trainable adapter factor (kept out of ``nnx.Param`` so the base stays a plain Mixtral)."""


# target -> (A shape symbols + logical axes, B shape symbols + logical axes); "r" is the rank.
_LAYOUT = {
    "q": ((("D", "embed"), ("r", "lora_rank")), (("r", "lora_rank"), ("N", "heads"), ("H", "head_dim"))),
    "k": ((("D", "embed"), ("r", "lora_rank")), (("r", "lora_rank"), ("K", "kv_heads"), ("H", "head_dim"))),
    "v": ((("D", "embed"), ("r", "lora_rank")), (("r", "lora_rank"), ("K", "kv_heads"), ("H", "head_dim"))),
    "o": ((("N", "heads"), ("H", "head_dim"), ("r", "lora_rank")), (("r", "lora_rank"), ("D", "embed"))),
    "router": ((("D", "embed"), ("r", "lora_rank")), (("r", "lora_rank"), ("E", "router_experts"))),
    "w1": ((("E", "experts"), ("D", "expert_embed"), ("r", "lora_rank")),
           (("E", "experts"), ("r", "lora_rank"), ("F", "expert_mlp"))),
    "w3": ((("E", "experts"), ("D", "expert_embed"), ("r", "lora_rank")),
           (("E", "experts"), ("r", "lora_rank"), ("F", "expert_mlp"))),
    "w2": ((("E", "experts"), ("F", "expert_mlp"), ("r", "lora_rank")),
           (("E", "experts"), ("r", "lora_rank"), ("D", "expert_embed"))),
    "lm_head": ((("D", "embed"), ("r", "lora_rank")), (("r", "lora_rank"), ("V", "vocab"))),
}
GROUPS = {"attn": ("q", "k", "v", "o"), "moe": ("router", "w1", "w3", "w2"), "head": ("lm_head",)}


def shapes(cfg: MixtralConfig, target: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(A shape, B shape) of one target, per layer."""
  sizes = {"D": cfg.hidden_size, "F": cfg.intermediate_size, "E": cfg.num_local_experts, "V": cfg.vocab_size,
           "N": cfg.num_attention_heads, "K": cfg.num_key_value_heads, "H": cfg.head_size, "r": rank}
  a, b = _LAYOUT[target]
  return tuple(sizes[s] for s, _ in a), tuple(sizes[s] for s, _ in b)


def is_expert(target: str) -> bool:
  return target in ("w1", "w2", "w3")


class Adapters(nnx.Module):
  """The adapters of one module: ``{target}_A`` and ``{target}_B`` for each adapted target."""

  def __init__(self, cfg: MixtralConfig, lora: LoraSection, targets: tuple[str, ...]):
    self.targets = tuple(targets)
    self.scale = lora.scale
    for t in self.targets:
      (a_shape, b_shape), (a_axes, b_axes) = shapes(cfg, t, lora.rank), _LAYOUT[t]
      setattr(self, f"{t}_A", LoRAParam(jnp.zeros(a_shape, jnp.float32), **{LOGICAL_AXES: tuple(n for _, n in a_axes)}))
      setattr(self, f"{t}_B", LoRAParam(jnp.zeros(b_shape, jnp.float32), **{LOGICAL_AXES: tuple(n for _, n in b_axes)}))

  def factors(self, target: str):
    return getattr(self, f"{target}_A")[...], getattr(self, f"{target}_B")[...]


def make(group: str, cfg: MixtralConfig, lora: LoraSection | None) -> Adapters | None:
  """The adapters of a module of ``group`` (attn, moe, head) that ``lora`` asks for, or None."""
  if lora is None or not lora.enabled:
    return None
  targets = tuple(t for t in GROUPS[group] if t in lora.targets)
  return Adapters(cfg, lora, targets) if targets else None


# ------------------------------------------------------------------------------------ forward


def add(adapters: Adapters | None, target: str, x, y):
  """``y + (x A) B * scale`` (x's trailing dims are A's leading ones; y's shape is x's batch dims + B's
  trailing ones), in x's dtype; ``y`` itself when ``target`` is not adapted."""
  if adapters is None or target not in adapters.targets:
    return y
  A, B = adapters.factors(target)
  xa = jnp.tensordot(x, A.astype(x.dtype), axes=A.ndim - 1)  # [..., r]
  delta = jnp.tensordot(xa, B.astype(x.dtype), axes=1) * jnp.asarray(adapters.scale, x.dtype)
  return y + delta.astype(y.dtype)


def adapted(adapters: Adapters | None, target: str, w):
  """``w + A B * scale`` (per expert for the expert targets), summed in float32 and cast to w's dtype;
  ``w`` itself when ``target`` is not adapted."""
  if adapters is None or target not in adapters.targets:
    return w
  A, B = adapters.factors(target)
  if is_expert(target):
    delta = jnp.einsum("eir,ero->eio", A, B, preferred_element_type=jnp.float32)
  else:
    delta = jnp.tensordot(A, B, axes=1).reshape(w.shape)
  return (w.astype(jnp.float32) + delta * adapters.scale).astype(w.dtype)


# ------------------------------------------------------------------------------------ training start


def init_values(adapters_state: dict, seed: int) -> dict:
  """Initial adapter values for a pure-dict tree of (abstract) adapters: every ``*_A`` uniform in
  +-1/sqrt(fan_in) (per layer and expert; PEFT's default), every ``*_B`` zero. Keys derive from the
  leaf's path, so the values do not depend on which targets are present."""
  base = jax.random.key(seed)

  def one(path, leaf):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if name.endswith("_B"):
      return jnp.zeros(leaf.shape, jnp.float32)
    target = name.rsplit("/", 1)[-1][:-2]
    n_in = len(_LAYOUT[target][0]) - 1 - is_expert(target)  # A is [(layers,) (E,) in..., r]
    fan_in = math.prod(leaf.shape[-1 - n_in:-1])
    bound = 1.0 / math.sqrt(fan_in)
    key = jax.random.fold_in(base, zlib.crc32(name.encode()))
    return jax.random.uniform(key, leaf.shape, jnp.float32, -bound, bound)

  return jax.tree_util.tree_map_with_path(one, adapters_state)
