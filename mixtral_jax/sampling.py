"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling, with
settings per row. One sampler serves ``generate`` and the server (both run the engine's programs).

For logits z_BV of the last position, row b with settings (temperature_b, top_k_b, top_p_b, seed_b,
index_b) at step step_b:

  1. temperature == 0: greedy, argmax_v z (ties to the lowest id, as ``torch.argmax``).
  2. z /= temperature.
  3. top_k > 0: keep the k largest logits (ties at the k-th value are all kept), the rest become -inf.
  4. top_p < 1: sort the survivors by probability; keep the smallest prefix whose probability mass
     reaches p (always at least the most likely token), the rest become -inf.
  5. Draw from softmax(z) with the key ``fold_in(fold_in(key(seed_b), step_b), index_b)``.

Steps 2-4 run in the order of transformers' logits processors (temperature, then top-k, then top-p).
``generate`` gives every row the call's seed and its index in the call's prompts, so a row's tokens
depend on the seed, the step and that index, never on how the batch was padded; a server request has
its own seed and index 0, so its tokens equal ``generate([prompt], seed=seed)`` alone, whatever else
is in the batch. When every row is greedy the sort-based filters are skipped (``lax.cond``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampling:
  """One request's sampling settings, checked (None means "off")."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    # NaN fails every comparison and inf divides the logits to zero (a uniform draw): both are refused
    # by name, never sampled from.
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 and finite (0 means greedy), got {self.temperature}")
    if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k
                                   or self.top_k < 1):
      raise ValueError(f"top_k must be a positive integer, or None for all tokens, got {self.top_k}")
    if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
      raise ValueError(f"top_p must be in (0, 1], or None for no nucleus filter, got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSettings:
  """Per-row sampling settings, arrays ``[B]``: top_k 0 and top_p 1 mean "off"; ``index`` is the row's
  key index (step 5 of the module docstring)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array
  index: jax.Array

  @classmethod
  def of(cls, rows) -> "RowSettings":
    """From one (temperature, top_k, top_p, seed, index) per row, with top_k 0 / top_p 1 for "off"."""
    cols = list(zip(*rows))
    dtypes = (np.float32, np.int32, np.float32, np.int32, np.int32)
    return cls(*(np.asarray(c, dt) for c, dt in zip(cols, dtypes)))

  @classmethod
  def abstract(cls, batch: int, sharding=None) -> "RowSettings":
    """Shapes only (for ahead-of-time lowering)."""
    def a(dtype):
      return jax.ShapeDtypeStruct((batch,), dtype, sharding=sharding)
    return cls(a(jnp.float32), a(jnp.int32), a(jnp.float32), a(jnp.int32), a(jnp.int32))


def filter_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
  """Steps 2-4 for one setting shared by all rows: tempered logits with every token outside the
  top-k / top-p set at -inf."""
  B = logits_BV.shape[0]
  full = lambda v, dt: jnp.full((B,), v, dt)  # noqa: E731
  return jax.vmap(_filter_row)(logits_BV, full(sampling.temperature, jnp.float32), full(sampling.top_k or 0, jnp.int32),
                               full(1.0 if sampling.top_p is None else sampling.top_p, jnp.float32))


def _filter_row(logits_V, temperature, top_k, top_p):
  V = logits_V.shape[-1]
  z_V = logits_V.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  sorted_V = jnp.sort(z_V, descending=True)
  kth = sorted_V[jnp.clip(top_k - 1, 0, V - 1)]
  z_V = jnp.where((top_k > 0) & (top_k < V) & (z_V < kth), -jnp.inf, z_V)
  sorted_V = jnp.sort(z_V, descending=True)
  probs_V = jax.nn.softmax(sorted_V)
  mass_before_V = jnp.cumsum(probs_V) - probs_V  # mass of the strictly more likely tokens
  keep_V = mass_before_V < top_p  # the first token always qualifies (mass before = 0)
  # The smallest kept logit is the threshold; ties with it stay in, as with a stable sort.
  threshold = jnp.min(jnp.where(keep_V, sorted_V, jnp.inf))
  return jnp.where((top_p < 1) & (z_V < threshold), -jnp.inf, z_V)


def _draw(logits_V, key, temperature, top_k, top_p):
  z_V = _filter_row(logits_V, temperature, top_k, top_p)
  drawn = jax.random.categorical(key, z_V).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, jnp.argmax(logits_V).astype(jnp.int32))


def _row_key(seed_key, step, index):
  return jax.random.fold_in(jax.random.fold_in(seed_key, step), index)


def sample_rows(logits_BV: jax.Array, settings: RowSettings, step_B) -> jax.Array:
  """Next token ids int32 [B] (see the module docstring); ``step_B`` is each row's step."""
  s = settings
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  step_B = jnp.broadcast_to(step_B, greedy_B.shape)

  def draw_all():
    keys_B = jax.vmap(lambda seed, step, i: _row_key(jax.random.key(seed), step, i))(s.seed, step_B, s.index)
    return jax.vmap(_draw)(logits_BV, keys_B, s.temperature, s.top_k, s.top_p)

  return jax.lax.cond(jnp.all(s.temperature <= 0), lambda: greedy_B, draw_all)


def sample(logits_BV: jax.Array, key: jax.Array, step, sampling: Sampling) -> jax.Array:
  """Next token ids [B] with one setting and PRNG key for every row, row b drawing with
  ``fold_in(fold_in(key, step), b)`` (what :func:`sample_rows` does with key(seed) and index b)."""
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  B = logits_BV.shape[0]
  keys_B = jax.vmap(lambda i: _row_key(key, step, i))(jnp.arange(B))
  z_BV = filter_logits(logits_BV, sampling)
  return jax.vmap(jax.random.categorical)(keys_B, z_BV).astype(jnp.int32)
