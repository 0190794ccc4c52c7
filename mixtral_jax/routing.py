"""Routing maths for the sparse MoE block, as pure functions that tests call directly.

Mixtral routing (Hugging Face semantics), for tokens x_ND and router logits z_NE = x_ND @ Wr_DE:

  1. p_NE = softmax(z_NE) over all E experts, in float32.
  2. (w_Nk, e_Nk) = top_k(p_NE, k): the k largest probabilities and their expert ids.
  3. w_Nk /= sum_k w_Nk: renormalise the k weights to sum to 1.
  4. y_ND = sum_k w_Nk * expert_{e_Nk}(x_ND), with expert_i(x) = w2_i(silu(w1_i x) * w3_i x).

Dispatch bookkeeping: the N*k routed (token, slot) pairs are ordered by priority = token position,
then slot (pair index n*k + j). Each pair's *rank* is its place among the pairs routed to the same
expert in that order. With a capacity C, pairs of rank >= C are dropped: they contribute zero and the
surviving weights are *not* renormalised (the token keeps its residual).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def router_probs(logits_NE: jax.Array) -> jax.Array:
  """Step 1: softmax over experts, always in float32."""
  return jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)


def top_k_route(logits_NE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Steps 1-3: returns (weights_Nk float32 summing to 1 per token, expert_ids_Nk int32).

  Ties break towards the lower expert id, as ``torch.topk`` does on CPU.
  """
  probs_NE = router_probs(logits_NE)
  top_p_Nk, ids_Nk = jax.lax.top_k(probs_NE, k)
  weights_Nk = top_p_Nk / jnp.sum(top_p_Nk, axis=-1, keepdims=True)
  return weights_Nk, ids_Nk.astype(jnp.int32)


def expert_ranks(ids_Nk: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Each pair's rank within its expert, in priority order, and the per-expert pair counts.

  Returns (rank_Nk int32, counts_E int32). O(N*k*E) work through a cumulative sum of one-hots,
  which is cheap for E = 8 and keeps the priority rule obvious.
  """
  flat_M = ids_Nk.reshape(-1)
  onehot_ME = jax.nn.one_hot(flat_M, num_experts, dtype=jnp.int32)
  ahead_ME = jnp.cumsum(onehot_ME, axis=0) - onehot_ME  # pairs of the same expert before this one
  rank_M = jnp.sum(ahead_ME * onehot_ME, axis=-1)
  counts_E = jnp.sum(onehot_ME, axis=0)
  return rank_M.reshape(ids_Nk.shape).astype(jnp.int32), counts_E.astype(jnp.int32)


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
  """Per-expert buffer size C. Dropless (``None``) means C = num_tokens: an expert can receive each
  token at most once, so nothing can ever drop."""
  if capacity_factor is None:
    return num_tokens
  return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * k / num_experts)))


def sort_by_expert(ids_Nk: jax.Array, num_experts: int):
  """Orders the N*k pairs by expert (stable, so priority order is kept inside each expert).

  Returns (order_M: pair index of each sorted row, counts_E, starts_E: first sorted row of each
  expert). Row r of the sorted layout holds token ``order_M[r] // k``.
  """
  flat_M = ids_Nk.reshape(-1)
  order_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
  counts_E = jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)
  starts_E = (jnp.cumsum(counts_E) - counts_E).astype(jnp.int32)
  return order_M, counts_E, starts_E


def load_fractions(ids_Nk: jax.Array, num_experts: int, mask_N: jax.Array | None = None) -> jax.Array:
  """Fraction of routed pairs that went to each expert (sums to 1); padding tokens excluded."""
  onehot_NkE = jax.nn.one_hot(ids_Nk, num_experts, dtype=jnp.float32)
  if mask_N is not None:
    onehot_NkE = onehot_NkE * mask_N.astype(jnp.float32)[:, None, None]
  counts_E = jnp.sum(onehot_NkE, axis=(0, 1))
  return counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
