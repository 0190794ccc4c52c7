"""The adapter parameters inside the model, and how the forward pass applies them.

Adapters are ``LoRAParam`` variables (not ``nnx.Param``), so ``nnx.state(model, nnx.Param)`` is still
exactly the base model: checkpoints, export and parameter counts never see them. Each adapted module
holds one :class:`Adapters` (or ``None``); the layer stack's ``nnx.vmap`` gives every adapter a leading
``layers`` axis like the weights it adapts, and the expert adapters carry the ``experts`` axis, so they
are sharded with their expert.

One form everywhere, PEFT's: ``y = x W + (drop(x) A) B * alpha/r``, the adapter's two thin matmuls
beside the frozen base's, which is never modified and never differentiated (the step differentiates the
adapters only, so no gradient of any W is formed).

* :func:`add`: attention (q, k, v, o) and the router;
* :func:`expert_adapters`: the expert weights. It hands the per-expert factors (A [E, in, r], B [E, r, out])
  to the MoE dispatch as a ``mixtral_jax.expert_adapters.ExpertLoRA``, and every expert implementation
  (dense, blocked with its hand-written VJP, ragged, the small-batch selected path, the expert-parallel
  ``shard_map`` with A and B sharded with their expert) applies them to the rows it computes;
* :func:`head_operands`: the LM head, as the fused cross-entropy's operands ``[h, drop(h) A]`` and
  ``[W; B alpha/r]`` (the same sum, one matmul).

Dropout (``lora.dropout``) is PEFT's: on the adapter's input, in training only (a key is given), each
element kept with probability 1 - p and scaled by 1 / (1 - p); an independent mask per target. The train
step derives the key from its rng and step (so a resumed run draws the same masks) and gives each layer
its own. Expert rows draw their masks by (token, slot) pair, so every dispatch drops the same elements.

Merging (``mixtral_jax.lora.merge``: export, and loading adapters for inference) does form W + A B alpha/r;
there the weight is what is wanted.

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

from mixtral_jax import param_paths
from mixtral_jax.config import MixtralConfig
from mixtral_jax.expert_adapters import TARGET_STREAM, ExpertLoRA
from mixtral_jax.layers import LOGICAL_AXES

from .spec import LoraSection


class LoRAParam(nnx.Variable):
  """A trainable adapter factor (kept out of ``nnx.Param`` so the base stays a plain Mixtral)."""


def _layout(w: param_paths.Weight):
  """(A's (symbol, logical axis) pairs, B's): A = [(E,) in..., r], B = [(E,) r, out...] from the weight's
  axes in the registry (an expert weight keeps its expert axis in front of both)."""
  pairs = tuple(zip(w.ours, w.axes))
  lead = pairs[:1] if w.ours[0] == "E" else ()
  rest = pairs[len(lead):]
  rank = (("r", "lora_rank"),)
  return lead + rest[:w.contracted] + rank, lead + rank + rest[w.contracted:]


def _group(w: param_paths.Weight) -> str:
  """The module that holds a target's adapters: the weight's own module (attn, moe), or the model's head."""
  return w.key[1] if w.key[0] == "blocks" else "head"


# target -> (A shape symbols + logical axes, B shape symbols + logical axes); "r" is the rank.
LAYOUT = {w.id: _layout(w) for w in param_paths.WEIGHTS if w.lora}
GROUPS = {g: tuple(t for t in LAYOUT if _group(param_paths.weight(t)) == g) for g in ("attn", "moe", "head")}


def adapter_key(target: str, factor: str) -> tuple[str, ...]:
  """The key of factor ``factor`` ("A" or "B") of ``target`` in the model's state (LoRAParam leaves):
  beside the adapted weight in its module, under ``lora`` (the model's head: ``lora_head``)."""
  key = param_paths.weight(target).key
  module = key[:-1] + ("lora",) if key[0] == "blocks" else ("lora_head",)
  return module + (f"{target}_{factor}",)


def shapes(cfg: MixtralConfig, target: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(A shape, B shape) of one target, per layer."""
  sizes = {"D": cfg.hidden_size, "F": cfg.intermediate_size, "E": cfg.num_local_experts, "V": cfg.vocab_size,
           "N": cfg.num_attention_heads, "K": cfg.num_key_value_heads, "H": cfg.head_size, "r": rank}
  a, b = LAYOUT[target]
  return tuple(sizes[s] for s, _ in a), tuple(sizes[s] for s, _ in b)


def is_expert(target: str) -> bool:
  return target in ("w1", "w2", "w3")


class Adapters(nnx.Module):
  """The adapters of one module: ``{target}_A`` and ``{target}_B`` for each adapted target."""

  def __init__(self, cfg: MixtralConfig, lora: LoraSection, targets: tuple[str, ...]):
    self.targets = tuple(targets)
    self.scale = lora.scale
    self.dropout = float(lora.dropout)
    self.slot_rank = lora.slot_rank  # a bank of adapters along the rank axis (serving), else None
    for t in self.targets:
      (a_shape, b_shape), (a_axes, b_axes) = shapes(cfg, t, lora.rank), LAYOUT[t]
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


def _dropout(adapters: Adapters, target: str, x, key):
  """PEFT dropout on ``x`` for ``target`` (a no-op without a key or with p = 0)."""
  if key is None or adapters.dropout == 0:
    return x
  keep = 1.0 - adapters.dropout
  mask = jax.random.bernoulli(jax.random.fold_in(key, TARGET_STREAM[target]), keep, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), 0).astype(x.dtype)


def slot_columns(u, adapter_B, slot_rank: int):
  """``u`` [..., S*r] (the inputs' product with a bank's A, S adapters of r columns each) with every
  column zeroed but those of the row's own adapter: column c belongs to slot ``c // r + 1``, and slot 0
  (the base) owns none. ``adapter_B`` [B]: each batch row's slot; u's leading dims are [B, ...] or the
  flattened [B*T] (the router, the expert pairs), row-major, so row n of a flattened u is batch row
  ``n // (len(u) // B)``. Zeroed by ``where``, so the other adapters add exact zeros."""
  lead, B = u.shape[:-1], adapter_B.shape[0]
  if lead[0] == B:
    s = jnp.broadcast_to(adapter_B.reshape((B,) + (1,) * (len(lead) - 1)), lead)
  else:
    s = jnp.repeat(adapter_B, lead[0] // B, total_repeat_length=lead[0]).reshape(lead)
  owner = jnp.arange(u.shape[-1]) // slot_rank + 1
  return jnp.where(owner == s[..., None], u, jnp.zeros((), u.dtype))


def add(adapters: Adapters | None, target: str, x, y, key=None, adapter_B=None):
  """``y + (drop(x) A) B * scale`` (x's trailing dims are A's leading ones; y's shape is x's batch dims +
  B's trailing ones), in x's dtype; ``y`` itself when ``target`` is not adapted. ``key``: dropout key.
  ``adapter_B`` [B]: with a bank of adapters (``slot_rank``), each batch row's adapter (0: the base); a bank
  without ``adapter_B`` computes the base."""
  if adapters is None or target not in adapters.targets:
    return y
  if adapters.slot_rank is not None and adapter_B is None:
    return y
  A, B = adapters.factors(target)
  xa = jnp.tensordot(_dropout(adapters, target, x, key), A.astype(x.dtype), axes=A.ndim - 1)  # [..., r]
  if adapters.slot_rank is not None:
    xa = slot_columns(xa, adapter_B, adapters.slot_rank)
  delta = jnp.tensordot(xa, B.astype(x.dtype), axes=1) * jnp.asarray(adapters.scale, x.dtype)
  return y + delta.astype(y.dtype)


def expert_adapters(adapters: Adapters | None, key=None, pair_adapter=None) -> ExpertLoRA | None:
  """The expert targets' factors for the MoE dispatch (B scaled by alpha/r in float32), or None.
  ``pair_adapter`` [N*k]: with a bank (``slot_rank``), the adapter slot of each routed (token, expert choice) pair;
  a bank without them computes the base (None)."""
  if adapters is None or not any(is_expert(t) for t in adapters.targets):
    return None
  if adapters.slot_rank is not None and pair_adapter is None:
    return None
  pairs = {}
  for t in ("w1", "w3", "w2"):
    if t in adapters.targets:
      A, B = adapters.factors(t)
      pairs[t] = (A, B * adapters.scale)
  dropping = key is not None and adapters.dropout > 0
  banked = adapters.slot_rank is not None
  return ExpertLoRA(**pairs, key=key if dropping else None, rate=adapters.dropout if dropping else 0.0,
                    pair_adapter=pair_adapter if banked else None, slot_rank=adapters.slot_rank if banked else None)


def head_operands(adapters: Adapters | None, h_BTD, w_DV, key=None, adapter_B=None):
  """(h, W) for ``logits = h @ W`` with the LM head's adapter folded in: ``[h, drop(h) A] @ [W; B scale]``
  equals ``h W + (drop(h) A) B scale``; (h_BTD, w_DV) themselves without an lm_head adapter. The concatenated
  operands are in h's and W's dtypes (A, B cast)."""
  if adapters is None or "lm_head" not in adapters.targets or (adapters.slot_rank is not None and adapter_B is None):
    return h_BTD, w_DV
  A, B = adapters.factors("lm_head")
  u_BTr = jnp.tensordot(_dropout(adapters, "lm_head", h_BTD, key), A.astype(h_BTD.dtype), axes=1)
  if adapters.slot_rank is not None:
    u_BTr = slot_columns(u_BTr, adapter_B, adapters.slot_rank)
  return (jnp.concatenate([h_BTD, u_BTr.astype(h_BTD.dtype)], axis=-1),
          jnp.concatenate([w_DV, (B * adapters.scale).astype(w_DV.dtype)], axis=0))


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
    n_in = len(LAYOUT[target][0]) - 1 - is_expert(target)  # A is [(layers,) (E,) in..., r]
    fan_in = math.prod(leaf.shape[-1 - n_in:-1])
    bound = 1.0 / math.sqrt(fan_in)
    key = jax.random.fold_in(base, zlib.crc32(name.encode()))
    return jax.random.uniform(key, leaf.shape, jnp.float32, -bound, bound)

  return jax.tree_util.tree_map_with_path(one, adapters_state)
