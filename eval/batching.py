"""Scoring many token sequences in few compiled shapes, on one device or a mesh.

``score_sequences(model, seqs)`` returns, for every sequence ``s``, the log-probability of each token
``s[t+1]`` given ``s[:t+1]`` and whether it was the argmax (``len(s) - 1`` values each). How:

  1. Sort by length, longest first (as lm-eval does: a batch's first row sets its padded length, and
     running out of memory happens at once if it happens at all).
  2. Shape buckets: a batch's inputs are right-padded to T = the next power of two >= its longest
     input (at least 16), and it holds B rows, B = ``batch_size`` halved until B * T fits
     ``max_tokens`` (a power of two, rounded up to the mesh's batch shards). Short batches are padded
     with empty rows, so each T bucket compiles exactly once.
  3. One jitted forward per batch: fp32 log-softmax of the logits, gathered at the targets, plus the
     argmax test. Inputs are ``s[:-1]`` and targets ``s[1:]``, so a sequence of ``max_position_embeddings
     + 1`` tokens (lm-eval's longest window) still fits the model's context.

With a mesh, the parameters are expected on it already (``from_pretrained(..., mesh=)``); the batch is
split over the data-like axes (logical axis ``batch``) and the step runs under ``jax.set_mesh``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.generate import bucket
from mixtral_jax.model import Mixtral


@nnx.jit(static_argnums=(4,))
def _score(model: Mixtral, inputs_BT, targets_BT, mask_BT, tail: int | None):
  h_BTD, _ = model.hidden(inputs_BT, attention_mask=mask_BT)
  if tail is not None:  # only each row's last `tail` real positions reach the LM head ([B, tail, V] logits)
    idx_BN = jnp.maximum(mask_BT.sum(1, keepdims=True) - tail, 0) + jnp.arange(tail)[None]
    h_BTD = jnp.take_along_axis(h_BTD, idx_BN[..., None], axis=1)
    targets_BT = jnp.take_along_axis(targets_BT, idx_BN, axis=1)
    mask_BT = jnp.take_along_axis(mask_BT, idx_BN, axis=1)
  logits_BTV = model.logits(h_BTD).astype(jnp.float32)
  logp_BTV = logits_BTV - jax.nn.logsumexp(logits_BTV, axis=-1, keepdims=True)
  lp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  return jnp.where(mask_BT > 0, lp_BT, 0.0), greedy_BT & (mask_BT > 0)


def batch_shards(mesh) -> int:
  if mesh is None:
    return 1
  return math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp", "expert"))


def plan(lengths: Sequence[int], batch_size: int, max_tokens: int, shards: int = 1) -> list[tuple[list[int], int, int]]:
  """Batches as (indices into ``lengths``, rows B, padded length T), longest first (module docstring)."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  out, at = [], 0
  while at < len(order):
    T = bucket(lengths[order[at]], 16)
    B = bucket(max(batch_size, 1))
    while B > 1 and B * T > max_tokens:
      B //= 2
    B = -(-B // shards) * shards
    out.append((order[at:at + B], B, T))
    at += B
  return out


def mesh_context(mesh):
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def score_sequences(model: Mixtral, seqs: Sequence[Sequence[int]], *, batch_size: int = 8,
                    max_tokens: int = 16384, mesh=None, bar=None, tail: int | None = None
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per sequence: (float32 log-probs [len-1], bool is-argmax [len-1]) of tokens 1..len-1.

  ``tail``: only the last ``min(tail, len-1)`` values of each (the LM head then runs on those positions
  only, so a 32k-token window costs ``[B, tail, V]`` logits, not ``[B, 32k, V]``).
  ``bar``: a tqdm bar advanced by one per sequence scored."""
  vocab = model.cfg.vocab_size
  for i, s in enumerate(seqs):
    if len(s) < 2:
      raise ValueError(f"sequence {i} has {len(s)} token(s); scoring needs at least 2")
    if min(s) < 0 or max(s) >= vocab:
      raise ValueError(f"sequence {i} holds a token id outside the model's vocabulary [0, {vocab})")
  results: list = [None] * len(seqs)
  sharding = None
  if mesh is not None:
    from mixtral_jax.sharding.rules import logical_sharding  # noqa: PLC0415
    sharding = logical_sharding(("batch", None), mesh)
  with mesh_context(mesh):
    for idx, B, T in plan([len(s) - 1 for s in seqs], batch_size, max_tokens, batch_shards(mesh)):
      inputs = np.zeros((B, T), np.int32)
      targets = np.zeros((B, T), np.int32)
      mask = np.zeros((B, T), np.int32)
      for r, i in enumerate(idx):
        s = np.asarray(seqs[i], np.int32)
        inputs[r, :len(s) - 1], targets[r, :len(s) - 1], mask[r, :len(s) - 1] = s[:-1], s[1:], 1
      arrays = [inputs, targets, mask]
      arrays = [jax.device_put(a, sharding) for a in arrays] if sharding is not None else [jnp.asarray(a) for a in arrays]
      span = None if tail is None or tail >= T else int(tail)
      lp, greedy = _score(model, *arrays, span)
      lp, greedy = np.asarray(lp), np.asarray(greedy)
      for r, i in enumerate(idx):
        n = len(seqs[i]) - 1
        if span is None:
          results[i] = (lp[r, :n][-(tail or n):], greedy[r, :n][-(tail or n):])
        else:  # rows shorter than the span were gathered from index 0: their values sit at the front
          m = min(span, n)
          results[i] = (lp[r, :m], greedy[r, :m])
      if bar is not None:
        bar.update(len(idx))
  return results
