"""Log-likelihood scoring and perplexity.

``token_logprobs`` is the primitive: for right-padded ids ``[B, T]`` it returns
``log p(x[t+1] | x[:t+1])`` for t = 0..T-2, computed as ``logits - logsumexp(logits)`` in fp32 and
gathered at the next token, with positions whose target is padding set to 0 and flagged invalid.

``perplexity`` is ``exp(-sum(log p) / n)`` over every predicted token of every sequence (a token-
weighted mean, as transformers' loss over a packed corpus), and ``loglikelihood`` scores a
continuation given a context (the lm-eval ``loglikelihood`` request: sum of the continuation's
log-probs and whether each of its tokens is the greedy choice).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.model import Mixtral


@nnx.jit
def _logprobs(model: Mixtral, ids_BT: jax.Array, mask_BT: jax.Array):
  logits_BTV = model(ids_BT, attention_mask=mask_BT).astype(jnp.float32)
  logp_BTV = logits_BTV[:, :-1] - jax.nn.logsumexp(logits_BTV[:, :-1], axis=-1, keepdims=True)
  target_BT = ids_BT[:, 1:]
  lp_BT = jnp.take_along_axis(logp_BTV, target_BT[..., None], axis=-1)[..., 0]
  greedy_BT = jnp.argmax(logp_BTV, axis=-1) == target_BT
  valid_BT = mask_BT[:, 1:].astype(bool) & mask_BT[:, :-1].astype(bool)
  return jnp.where(valid_BT, lp_BT, 0.0), greedy_BT & valid_BT, valid_BT


def _pad(seqs: Sequence[Sequence[int]], multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads to a length rounded up to ``multiple`` (few compiled shapes)."""
  longest = max(len(s) for s in seqs)
  T = -(-longest // multiple) * multiple
  ids = np.zeros((len(seqs), T), np.int32)
  mask = np.zeros((len(seqs), T), np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
    mask[i, :len(s)] = 1
  return ids, mask


def _check(seqs: Sequence[Sequence[int]], model: Mixtral) -> None:
  if not seqs:
    raise ValueError("nothing to score: no sequences given")
  ctx, vocab = model.cfg.max_position_embeddings, model.cfg.vocab_size
  for i, s in enumerate(seqs):
    if len(s) < 2:
      raise ValueError(f"sequence {i} has {len(s)} token(s); scoring needs at least 2")
    if len(s) > ctx:
      raise ValueError(f"sequence {i} has {len(s)} tokens, more than the model's context of {ctx}; "
                       "split it into windows first")
    bad = [t for t in s if not 0 <= int(t) < vocab]
    if bad:
      raise ValueError(f"sequence {i} holds token id {bad[0]} outside the model's vocabulary [0, {vocab})")


def token_logprobs(model: Mixtral, seqs: Sequence[Sequence[int]], *, batch_size: int = 8) -> list[np.ndarray]:
  """Per sequence, the float32 log-probability of each token after the first (``len(s) - 1`` values)."""
  _check(seqs, model)
  out: list[np.ndarray] = []
  for start in range(0, len(seqs), batch_size):
    chunk = seqs[start:start + batch_size]
    ids, mask = _pad(chunk)
    lp, _, _ = _logprobs(model, jnp.asarray(ids), jnp.asarray(mask))
    lp = np.asarray(lp)
    out.extend(lp[i, :len(s) - 1] for i, s in enumerate(chunk))
  return out


def perplexity(model: Mixtral, seqs: Sequence[Sequence[int]], *, batch_size: int = 8) -> float:
  """Token-weighted perplexity of ``model`` on token sequences (each scored from its first token)."""
  lps = token_logprobs(model, seqs, batch_size=batch_size)
  total = sum(float(np.sum(lp, dtype=np.float64)) for lp in lps)
  count = sum(lp.size for lp in lps)
  return float(np.exp(-total / count))


def loglikelihood(model: Mixtral, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool]:
  """``(sum log p(continuation | context), every continuation token is the greedy choice)``."""
  if not context or not continuation:
    raise ValueError("loglikelihood needs a non-empty context and continuation")
  seq = list(context) + list(continuation)
  _check([seq], model)
  ids, mask = _pad([seq])
  lp, greedy, _ = _logprobs(model, jnp.asarray(ids), jnp.asarray(mask))
  first, last = len(context) - 1, len(seq) - 1  # predictions of tokens len(context)..len(seq)-1
  return float(np.sum(np.asarray(lp)[0, first:last], dtype=np.float64)), bool(np.all(np.asarray(greedy)[0, first:last]))
