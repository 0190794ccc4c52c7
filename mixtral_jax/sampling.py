"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

For logits z_BV of the last position and one PRNG key per row:

  1. temperature == 0: greedy, argmax_v z (ties to the lowest id, as ``torch.argmax``).
  2. z /= temperature.
  3. top_k: keep the k largest logits (ties at the k-th value are all kept), the rest become -inf.
  4. top_p: sort the survivors by probability; keep the smallest prefix whose probability mass
     reaches p (always at least the most likely token), the rest become -inf.
  5. Draw from softmax(z) with the row's key.

Steps 2-4 run in the order of transformers' logits processors (temperature, then top-k, then top-p).
Each row draws with its own key ``fold_in(fold_in(seed_key, step), row)``, so a row's tokens depend on
the seed, the step and its index in the batch, never on how the batch was padded for compilation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick tokens. Hashable: it is a static argument of the compiled prefill and decode steps."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be a positive integer or None, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filter_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
  """Steps 2-4: tempered logits with every token outside the top-k / top-p set at -inf."""
  z_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < z_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(z_BV, sampling.top_k)[0][:, -1:]
    z_BV = jnp.where(z_BV < kth_B1, -jnp.inf, z_BV)
  if sampling.top_p is not None and sampling.top_p < 1:
    sorted_BV = jnp.sort(z_BV, axis=-1, descending=True)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the strictly more likely tokens
    keep_BV = mass_before_BV < sampling.top_p  # the first token always qualifies (mass before = 0)
    # The smallest kept logit is the threshold; ties with it stay in, as with a stable sort.
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    z_BV = jnp.where(z_BV < threshold_B1, -jnp.inf, z_BV)
  return z_BV


def row_keys(key: jax.Array, step, batch: int) -> jax.Array:
  """One key per row for this step: fold_in(fold_in(key, step), row)."""
  step_key = jax.random.fold_in(key, step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch))


def sample(logits_BV: jax.Array, key: jax.Array, step, sampling: Sampling) -> jax.Array:
  """Next token ids int32 [B] (see module docstring)."""
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  z_BV = filter_logits(logits_BV, sampling)
  keys_B = row_keys(key, step, logits_BV.shape[0])
  return jax.vmap(jax.random.categorical)(keys_B, z_BV).astype(jnp.int32)
