"""Per-expert LoRA adapters as the expert FFN kernels apply them: inside the local expert computation.

For an adapted expert weight W_e (w1, w3: D -> F; w2: F -> D) the expert computes

  x W_e + (drop(x) A_e) B_e            A_e [in, r], B_e [r, out], B already scaled by alpha / r

on the rows it holds, in the compute dtype, beside the base matmul: the base weight is read, never
modified, and (being frozen) never differentiated. Every expert implementation (dense buckets, ragged
groups, the blocked kernel, the small-batch selected path, and the expert-parallel ``shard_map``, which
shards A and B with their expert) takes an :class:`ExpertLoRA` and applies it this way.

Dropout is PEFT's: on the adapter's input only, in training only, each element kept with probability
1 - rate and scaled by 1 / (1 - rate). Each (target, row) draws its mask from
``fold_in(fold_in(key, target), id)``, where ``id`` is the (token, slot) pair the row holds, ``token *
k + slot`` over the whole batch. So the mask follows the pair, not where a dispatch happens to put it:
dense, blocked, ragged and expert-parallel runs of one step drop the same elements. (PEFT itself refuses
dropout on its fused expert parameters: it applies adapters as a weight delta, which has no input to drop.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Dropout stream of each adapted weight (attention and router targets use theirs in mixtral_jax.lora).
TARGET_STREAM = {"q": 1, "k": 2, "v": 3, "o": 4, "router": 5, "w1": 6, "w3": 7, "w2": 8, "lm_head": 9}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertLoRA:
  """One layer's expert adapters: for each of w1, w3, w2 an ``(A [E, in, r], B [E, r, out])`` pair with B
  already multiplied by alpha / r, or None when that weight is not adapted.

  ``key``: this layer's dropout key (raw uint32 [2]) in training with ``rate > 0``, else None.
  ``tensor_axis``: inside ``shard_map``, the mesh axis that splits F (so w2's input row is a slice of a
  row whose mask is drawn whole, the same mask a single device draws).

  ``pair_adapter`` (serving a bank of adapters, ``mixtral_jax.lora.bank``): int32 [N*k], the adapter slot
  of each routed pair; the rank axis then holds the bank's adapters side by side, ``slot_rank`` columns
  each, and a row keeps only its pair's adapter's columns (:func:`own_columns`)."""
  w1: tuple | None = None
  w3: tuple | None = None
  w2: tuple | None = None
  key: jax.Array | None = None
  rate: float = dataclasses.field(default=0.0, metadata={"static": True})
  tensor_axis: str | None = dataclasses.field(default=None, metadata={"static": True})
  pair_adapter: jax.Array | None = None
  slot_rank: int | None = dataclasses.field(default=None, metadata={"static": True})

  def get(self, target: str):
    return getattr(self, target)

  @property
  def dropping(self) -> bool:
    return self.key is not None and self.rate > 0

  @property
  def needs_rows(self) -> bool:
    """Whether the kernels must pass each row's pair id: for dropout masks or for the row's adapter."""
    return self.dropping or self.pair_adapter is not None

  def expert(self, e) -> ExpertLoRA:
    """Expert ``e``'s adapters (A [in, r], B [r, out]); ``e`` static or traced."""
    pick = lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False)  # noqa: E731
    return dataclasses.replace(self, **{t: None if self.get(t) is None else tuple(map(pick, self.get(t)))
                                         for t in ("w1", "w3", "w2")})


def drop(lora: ExpertLoRA | None, target: str, x_RI, rows_R):
  """``x`` with PEFT dropout for ``target`` (see the module docstring); ``x`` itself when not dropping.
  ``rows_R``: the pair id of every row (any shape matching x's leading dims; ids < 0 mark empty rows)."""
  if lora is None or not lora.dropping:
    return x_RI
  keep = 1.0 - lora.rate
  width = x_RI.shape[-1]
  full, offset = width, 0
  if target == "w2" and lora.tensor_axis is not None:
    full = width * jax.lax.axis_size(lora.tensor_axis)
    offset = jax.lax.axis_index(lora.tensor_axis) * width
  key = jax.random.fold_in(lora.key, TARGET_STREAM[target])

  def row_mask(i):
    m = jax.random.bernoulli(jax.random.fold_in(key, i), keep, (full,))
    return m if full == width else jax.lax.dynamic_slice_in_dim(m, offset, width)

  ids = jnp.maximum(rows_R, 0).reshape(-1).astype(jnp.uint32)
  mask = jax.vmap(row_mask)(ids).reshape(x_RI.shape)
  return jnp.where(mask, x_RI / jnp.asarray(keep, x_RI.dtype), 0).astype(x_RI.dtype)


def own_columns(lora: ExpertLoRA, u_Rr, rows_R):
  """``u`` (the rows' product with A) with only each row's own adapter's columns kept, for a bank
  (``pair_adapter``; column c belongs to adapter slot c // slot_rank + 1, slot 0 the base owns none);
  ``u`` itself otherwise. ``rows_R``: the pair id of every row (< 0: an empty row, its output unused)."""
  if lora.pair_adapter is None:
    return u_Rr
  adapter_R = lora.pair_adapter[jnp.maximum(rows_R, 0)]
  owner = jnp.arange(u_Rr.shape[-1]) // lora.slot_rank + 1
  return jnp.where(owner == adapter_R[..., None], u_Rr, jnp.zeros((), u_Rr.dtype))


def project(lora: ExpertLoRA | None, target: str, x_RI, y_RO, rows_R=None):
  """One expert's ``y + (drop(x) A) B`` (A [in, r], B [r, out] of :meth:`ExpertLoRA.expert`), in y's
  dtype; ``y`` when ``target`` is not adapted."""
  if lora is None or lora.get(target) is None:
    return y_RO
  A, B = lora.get(target)
  u_Rr = own_columns(lora, drop(lora, target, x_RI, rows_R) @ A.astype(x_RI.dtype), rows_R)
  return y_RO + (u_Rr @ B.astype(x_RI.dtype)).astype(y_RO.dtype)


def project_buckets(lora: ExpertLoRA | None, target: str, x_ECI, y_ECO, rows_EC=None):
  """:func:`project` for every expert's bucket at once (A [E, in, r], B [E, r, out])."""
  if lora is None or lora.get(target) is None:
    return y_ECO
  A, B = lora.get(target)
  u_ECr = jnp.einsum("eci,eir->ecr", drop(lora, target, x_ECI, rows_EC), A.astype(x_ECI.dtype))
  u_ECr = own_columns(lora, u_ECr, rows_EC)
  return y_ECO + jnp.einsum("ecr,ero->eco", u_ECr, B.astype(x_ECI.dtype)).astype(y_ECO.dtype)


def project_ragged(lora: ExpertLoRA | None, target: str, x_MI, y_MO, sizes_E, dot, rows_M=None):
  """:func:`project` for contiguous expert groups through ``dot`` (``ragged_dot``)."""
  if lora is None or lora.get(target) is None:
    return y_MO
  A, B = lora.get(target)
  u_Mr = own_columns(lora, dot(drop(lora, target, x_MI, rows_M), A.astype(x_MI.dtype), sizes_E), rows_M)
  return y_MO + dot(u_Mr, B.astype(x_MI.dtype), sizes_E).astype(y_MO.dtype)


def shard_specs(lora: ExpertLoRA | None, tensor: str | None):
  """``shard_map`` in_specs of ``lora``: A and B split over ``expert`` like their weight, F over
  ``tensor``; the key replicated."""
  if lora is None:
    return None
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  specs = {"w1": (P("expert", None, None), P("expert", None, tensor)),
           "w3": (P("expert", None, None), P("expert", None, tensor)),
           "w2": (P("expert", tensor, None), P("expert", None, None))}
  return dataclasses.replace(lora, key=None if lora.key is None else P(),
                             **{t: None if lora.get(t) is None else specs[t] for t in ("w1", "w3", "w2")})
