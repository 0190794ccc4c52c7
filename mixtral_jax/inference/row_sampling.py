"""Sampling with settings per row: what :func:`mixtral_jax.sampling.sample` does for one static
setting, with temperature, top-k, top-p, seed and step given as arrays ``[B]``.

Row b is sampled exactly as ``sampling.sample`` samples row 0 of a batch of one with
``Sampling(temperature_b, top_k_b, top_p_b)``, the key ``jax.random.key(seed_b)`` and step ``step_b``:

  1. temperature 0: argmax (ties to the lowest id).
  2. z = logits / temperature; top_k_b > 0 keeps the logits >= the k-th largest; top_p_b < 1 keeps the
     smallest most-likely prefix whose mass reaches p (ties with its last logit stay in).
  3. Draw from softmax(z) with ``fold_in(fold_in(key(seed_b), step_b), 0)``: the key ``generate`` gives
     row 0 at that step. So a request's tokens depend on its own seed and step, never on its slot or
     on what else is in the batch, and equal ``generate([prompt], seed=seed)`` alone.

When every row is greedy the sort-based filters are skipped (``lax.cond``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _filter_row(logits_V, temperature, top_k, top_p):
  V = logits_V.shape[-1]
  z_V = logits_V.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  sorted_V = jnp.sort(z_V, descending=True)
  kth = sorted_V[jnp.clip(top_k - 1, 0, V - 1)]
  z_V = jnp.where((top_k > 0) & (top_k < V) & (z_V < kth), -jnp.inf, z_V)
  sorted_V = jnp.sort(z_V, descending=True)
  probs_V = jax.nn.softmax(sorted_V)
  keep_V = (jnp.cumsum(probs_V) - probs_V) < top_p
  threshold = jnp.min(jnp.where(keep_V, sorted_V, jnp.inf))
  return jnp.where((top_p < 1) & (z_V < threshold), -jnp.inf, z_V)


def _sample_row(logits_V, temperature, top_k, top_p, seed, step):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 0)
  z_V = _filter_row(logits_V, temperature, top_k, top_p)
  drawn = jax.random.categorical(key, z_V).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, jnp.argmax(logits_V).astype(jnp.int32))


def sample_rows(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, step_B) -> jax.Array:
  """Next token ids int32 [B]. ``top_k_B`` 0 and ``top_p_B`` 1 mean "off" (see module docstring)."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.lax.cond(
      jnp.all(temperature_B <= 0), lambda: greedy_B,
      lambda: jax.vmap(_sample_row)(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, step_B))
