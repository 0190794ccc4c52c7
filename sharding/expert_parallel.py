"""Expert-parallel MoE dispatch: one visible ``shard_map``; tokens travel to their experts by all-to-all.

Placement inside the ``shard_map`` (per device):

* tokens ``x_nD`` (and their routing ``w_nk``, ``ids_nk``): the n = N / (data*fsdp*expert) local tokens,
  replicated over ``tensor``;
* expert weights: the E_l = E / n_expert local experts, their FFN width F split over ``tensor``. Weights
  split over ``fsdp`` inside an expert are gathered over ``fsdp`` on entry, which is FSDP's own
  communication; no device ever holds an expert it does not own, forward or backward.

Bucketed dispatch (``dropping`` with a capacity factor, and ``dropless`` on CPU), per device:

  1. Route-local ranks: each local (token, slot) pair gets its rank among the local pairs routed to the
     same expert, in priority order (token position, then slot; ``routing.expert_ranks``).
  2. Bucket: pairs of rank < C go to row ``rank`` of their expert's bucket, ``x_ECD``. Dropping:
     C = ceil(cf * n * k / E) (``routing.capacity`` on the local token count). Dropless: C = n, since an
     expert receives a token at most once, so nothing can drop.
  3. ``all_to_all`` over ``expert``: bucket e goes to the device owning expert e, which receives
     ``[E_l, n_expert * C, D]`` (local expert, then source device, then rank).
  4. Local experts: dropping runs them as one batched einsum over the full buckets; dropless runs the
     blocked grouped FFN over the true count of every (expert, source) bucket, so work follows routing.
  5. ``all_to_all`` back, the exact inverse of 3.
  6. Combine: ``y_n = sum_k w_nk * y_nk`` in float32; a dropped pair contributes zero and the remaining
     weights are not renormalised; then ``psum`` over ``tensor`` (each tensor shard holds a partial sum
     over its slice of F).

Ragged dispatch (dropless on GPU/TPU): pairs sorted by expert are sent with ``ragged_all_to_all`` so
only real rows travel; the receiver lays them out grouped by local expert (then source) and runs
``ragged_dot``; a second ``ragged_all_to_all`` (the transpose of the first) brings them back.
XLA:CPU does not implement ``ragged_all_to_all``, so on CPU a ``ragged`` request runs the bucketed
dropless path.

LoRA on the experts (``lora``, an ``ExpertLoRA``): A and B enter the ``shard_map`` split like their
weight (``expert``, and F over ``tensor``), and the local experts apply them to the rows they received
(``x W_e + (drop(x) A_e) B_e``; for w2 each tensor shard adds its partial sum, which step 6's ``psum``
completes). With dropout, each row's pair id (global ``token * k + slot``) travels with it, so the
masks are those of a single device.

Tokens whose count N does not divide the batch shards are padded with pairs routed nowhere (expert id
E): they take no capacity, are not counted in the dropped fraction, and are cut off on return.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from mixtral_jax import experts, routing
from mixtral_jax.expert_adapters import ExpertLoRA, shard_specs
from mixtral_jax.sharding.mesh import current_platform

BATCH_AXES = ("data", "fsdp", "expert")  # the logical "batch" axis of sharding.rules
f32 = jnp.float32


def dispatch_mode(capacity_factor: float | None, impl: str, backend: str | None = None) -> str:
  """``capacity`` (dropping, batched einsum), ``blocked`` or ``dense`` (dropless buckets), ``ragged``
  (``ragged_all_to_all`` and a grouped GEMM).

  ``backend`` defaults to the platform of the mesh being traced for (``current_platform``), not the
  process's default backend: a TPU program compiled on a CPU host must get ``ragged_all_to_all``. On GPU
  a dropless dispatch over worst-case buckets (``dense``) is an error naming the fix, never a slow run
  (``experts.grouped_kernel`` refuses ``lax.ragged_dot``'s expansion the same way)."""
  if capacity_factor is not None:
    return "capacity"
  platform = backend or current_platform()
  impl = experts.resolve_impl(impl, platform)
  if impl in experts.GROUPED_GEMM:
    return "blocked" if platform == "cpu" else "ragged"  # XLA:CPU has no ragged_all_to_all
  if impl == "dense" and platform == "gpu":
    raise ValueError("moe_impl='dense' without capacity_factor computes every expert over worst-case buckets "
                     "on GPU; use moe_impl='auto' (a grouped GEMM) or set capacity_factor")
  return impl


def moe_expert_parallel(x_ND, weights_Nk, ids_Nk, w1_EDF, w3_EDF, w2_EFD, *, capacity_factor=None,
                        impl: str = "auto", block: int = 128, lora: ExpertLoRA | None = None):
  """MoE experts over the current mesh's ``expert`` axis. Returns (y_ND in x's dtype, dropped fraction).

  Call under ``jax.set_mesh(mesh)`` (inside or outside ``jit``); the router has already run:
  ``weights_Nk``/``ids_Nk`` come from ``routing.top_k_route``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "expert" not in mesh.axis_names:
    raise ValueError("moe_expert_parallel needs a mesh with an 'expert' axis; call it under jax.set_mesh")
  sizes = dict(mesh.shape)
  E = w1_EDF.shape[0]
  if E % sizes["expert"]:
    raise ValueError(f"mesh axis expert={sizes['expert']} does not divide the {E} experts")
  batch_axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1 or a == "expert")
  tensor = "tensor" if sizes.get("tensor", 1) > 1 else None
  shards = math.prod(sizes[a] for a in batch_axes)

  N = x_ND.shape[0]
  pad = -N % shards
  if pad:
    x_ND = jnp.pad(x_ND, ((0, pad), (0, 0)))
    weights_Nk = jnp.pad(weights_Nk, ((0, pad), (0, 0)))
    ids_Nk = jnp.pad(ids_Nk, ((0, pad), (0, 0)), constant_values=E)  # routed nowhere

  tok = P(batch_axes or None, None)
  w_in, w_out = P("expert", None, tensor), P("expert", tensor, None)
  if lora is not None:
    lora = dataclasses.replace(lora, tensor_axis=tensor)
  mode = dispatch_mode(capacity_factor, impl)
  kernel = experts.grouped_kernel(impl) if mode == "ragged" else None  # raises where it would expand
  local = functools.partial(_local_moe, mode=mode, kernel=kernel, capacity_factor=capacity_factor, block=block,
                            batch_axes=batch_axes, tensor_axis=tensor)
  with jax.named_scope("moe_expert_parallel"):
    y_ND, dropped = jax.shard_map(local, in_specs=(tok, tok, tok, w_in, w_in, w_out, shard_specs(lora, tensor)),
                                  out_specs=(tok, P()))(x_ND, weights_Nk, ids_Nk, w1_EDF, w3_EDF, w2_EFD, lora)
  return y_ND[:N], dropped


def _pair_ids(n, k, batch_axes):
  """Global pair ids ``token * k + slot`` of this device's [n, k] pairs (tokens are split over
  ``batch_axes`` in contiguous blocks, the first axis major)."""
  shard = 0
  for a in batch_axes:
    shard = shard * jax.lax.axis_size(a) + jax.lax.axis_index(a)
  return ((shard * n + jnp.arange(n, dtype=jnp.int32))[:, None] * k + jnp.arange(k, dtype=jnp.int32)).astype(jnp.int32)


def _local_moe(x_nD, w_nk, ids_nk, w1_LDF, w3_LDF, w2_LFD, lora, *, mode, kernel, capacity_factor, block,
               batch_axes, tensor_axis):
  """The per-device body of the ``shard_map`` (L = E_l local experts)."""
  n, k = ids_nk.shape
  E = w1_LDF.shape[0] * jax.lax.axis_size("expert")
  valid_nk = ids_nk < E
  pairs_nk = _pair_ids(n, k, batch_axes) if lora is not None and lora.dropping else None
  if mode == "ragged":
    y_nkD = _ragged_exchange(x_nD, ids_nk, w1_LDF, w3_LDF, w2_LFD, E, lora, pairs_nk, kernel)
    kept_nk = valid_nk
  else:
    C = routing.capacity(n, k, E, capacity_factor)
    y_nkD, kept_nk = _bucket_exchange(x_nD, ids_nk, w1_LDF, w3_LDF, w2_LFD, E, C, mode, block, lora, pairs_nk)

  y_nkD = checkpoint_name(y_nkD, experts.EXPERT_OUT)  # kept by remat save_projections: no second exchange
  y_nD = jnp.einsum("nkd,nk->nd", y_nkD.astype(f32), w_nk.astype(f32))  # as transformers: weights in f32
  if tensor_axis is not None:
    y_nD = jax.lax.psum(y_nD, tensor_axis)
  counts = jnp.stack([jnp.sum(valid_nk & ~kept_nk), jnp.sum(valid_nk)]).astype(f32)
  if batch_axes:
    counts = jax.lax.psum(counts, batch_axes)
  return y_nD.astype(x_nD.dtype), counts[0] / jnp.maximum(counts[1], 1.0)


def _bucket_exchange(x_nD, ids_nk, w1_LDF, w3_LDF, w2_LFD, E, C, mode, block, lora=None, pairs_nk=None):
  """Steps 1-5 with fixed-size buckets. Returns (y_nkD, kept_nk); dropped pairs come back as zero."""
  n, D = x_nD.shape
  k = ids_nk.shape[1]
  L = w1_LDF.shape[0]
  rank_nk, counts_E = routing.expert_ranks(ids_nk, E)  # pairs routed nowhere (id E) rank nowhere
  kept_nk = (ids_nk < E) & (rank_nk < C)
  slot_nk = jnp.where(kept_nk, ids_nk * C + rank_nk, E * C)  # E * C is out of bounds: dropped
  x_nkD = jnp.broadcast_to(x_nD[:, None, :], (n, k, D))
  x_ECD = jnp.zeros((E * C, D), x_nD.dtype).at[slot_nk.reshape(-1)].set(
      x_nkD.reshape(-1, D), mode="drop").reshape(E, C, D)

  # [E, C, D] -> [L, S*C, D]: the bucket of expert e = d*L + l goes to device d, where source s's copy
  # lands in rows [s*C, (s+1)*C) of local expert l.
  x_LRD = jax.lax.all_to_all(x_ECD, "expert", 0, 1, tiled=True)
  rows_LR = None
  if pairs_nk is not None:  # dropout: every row's pair id travels with it (-1: empty)
    rows_EC = jnp.full((E * C,), -1, jnp.int32).at[slot_nk.reshape(-1)].set(pairs_nk.reshape(-1), mode="drop")
    rows_LR = jax.lax.all_to_all(rows_EC.reshape(E, C), "expert", 0, 1, tiled=True)
  if mode == "capacity" or mode == "dense":
    y_LRD = experts.dense_expert_ffn(x_LRD, w1_LDF, w3_LDF, w2_LFD, lora, rows_LR)
  else:
    S = E // L
    # Received counts, indexed [source, local expert] -> groups ordered (local expert, source).
    recv_SL = jax.lax.all_to_all(jnp.minimum(counts_E, C), "expert", 0, 0, tiled=True).reshape(S, L)
    sizes_G = recv_SL.T.reshape(-1)
    starts_G = (jnp.arange(L * S, dtype=jnp.int32) * C).astype(jnp.int32)
    y_MD = experts.grouped_expert_ffn(x_LRD.reshape(L * S * C, D), starts_G, sizes_G, w1_LDF, w3_LDF,
                                      w2_LFD, impl="blocked", block=block, lora=lora,
                                      rows_M=None if rows_LR is None else rows_LR.reshape(-1))
    y_LRD = y_MD.reshape(L, S * C, D)
  y_ECD = jax.lax.all_to_all(y_LRD, "expert", 1, 0, tiled=True)  # the inverse exchange

  y_nkD = y_ECD.reshape(E * C, D)[jnp.where(kept_nk, slot_nk, 0)]
  return jnp.where(kept_nk[..., None], y_nkD, 0), kept_nk


def _ragged_exchange(x_nD, ids_nk, w1_LDF, w3_LDF, w2_LFD, E, lora=None, pairs_nk=None, kernel="lax"):
  """Dropless dispatch with ``ragged_all_to_all``: only the routed rows travel. Returns y_nkD."""
  n, D = x_nD.shape
  k = ids_nk.shape[1]
  L = w1_LDF.shape[0]
  S = E // L
  M = n * k
  me = jax.lax.axis_index("expert")

  order_M, counts_E, starts_E = routing.sort_by_expert(ids_nk, E)  # id E (padding) sorts last, unsent
  x_MD = x_nD[order_M // k]
  counts_SE = jax.lax.all_gather(counts_E, "expert")  # every source's per-expert counts
  # On receiver d, rows are grouped by local expert j, then by source s. Where does my slice for
  # global expert e = d*L + j land there? After all rows of d's experts before j, then after the rows
  # that sources before me send to e.
  per_expert_E = jnp.sum(counts_SE, axis=0)
  within_E = (jnp.cumsum(per_expert_E.reshape(S, L), axis=1) - per_expert_E.reshape(S, L)).reshape(-1)
  before_me_E = (jnp.cumsum(counts_SE, axis=0) - counts_SE)[me]
  out_offsets_E = (within_E + before_me_E).astype(jnp.int32)
  # Entry i = s*L + j of what I receive: source s's slice for my local expert j.
  recv_SL = jax.lax.dynamic_slice_in_dim(counts_SE, me * L, L, axis=1)
  recv_sizes = recv_SL.reshape(-1).astype(jnp.int32)

  R = S * n * min(k, L)  # worst case: every source sends each of its tokens to min(k, L) of my experts
  x_RD = jax.lax.ragged_all_to_all(x_MD, jnp.zeros((R, D), x_MD.dtype), starts_E, counts_E, out_offsets_E,
                                   recv_sizes, axis_name="expert")
  rows_R = None
  if pairs_nk is not None:  # dropout: every row's pair id travels with it
    rows_R = jax.lax.ragged_all_to_all(pairs_nk.reshape(-1)[order_M], jnp.full((R,), -1, jnp.int32), starts_E,
                                       counts_E, out_offsets_E, recv_sizes, axis_name="expert")
  y_RD = experts.ragged_expert_ffn(x_RD, jnp.sum(recv_SL, axis=0).astype(jnp.int32), w1_LDF, w3_LDF, w2_LFD,
                                   lora, rows_R, kernel=kernel)

  # Back along the same slices: what I received at out_offsets (as the sender computed them) returns
  # to where it started in the sender's sorted layout.
  back_in = jax.lax.all_to_all(out_offsets_E, "expert", 0, 0, tiled=True)
  back_out = jax.lax.all_to_all(starts_E, "expert", 0, 0, tiled=True)
  y_MD = jax.lax.ragged_all_to_all(y_RD, jnp.zeros((M, D), y_RD.dtype), back_in, recv_sizes, back_out,
                                   counts_E, axis_name="expert")
  inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(M, dtype=order_M.dtype))
  return y_MD[inverse_M].reshape(n, k, D)
