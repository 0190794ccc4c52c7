"""Training losses: next-token cross-entropy fused with the LM head, the MoE load-balancing loss, and
the router z-loss.

Dimension letters as in ``mixtral_jax.config`` (L layers, B batch, T tokens, D width, E experts, V vocab).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

f32 = jnp.float32


# ------------------------------------------------------------------------ load balancing


def load_balancing_loss(router_logits, num_experts_per_tok: int, attention_mask=None, *,
                        per_layer: bool = False) -> jax.Array:
  """The auxiliary load-balancing loss of Switch Transformer, as Mixtral trains with it.

  router_logits: float [L, B, T, E]; attention_mask: [B, T] (1 = real token) or None.

  Pooled (default, exactly transformers' ``load_balancing_loss_func``): every layer's tokens are one pool.
    p = softmax(logits) over E (float32); e = top-k(p) as a one-hot count per token (sums to k);
    f_E = sum over layers and real tokens of e / (L * #real);  P_E = the same sum of p / (L * #real);
    loss = E * sum_E f_E * P_E.
  Per layer (``per_layer=True``, Switch/GShard style): the same statistic inside each layer, then the
  mean over layers: loss = mean_L E * sum_E f_LE * P_LE. Both are 1.0 under perfectly uniform routing
  with k = 1, and k under uniform top-k routing. Gradients reach the logits only through P (the top-k
  counts are piecewise constant), as in transformers.
  """
  L, B, T, E = router_logits.shape
  probs_LBTE = jax.nn.softmax(router_logits.astype(f32), axis=-1)
  _, ids_LBTk = jax.lax.top_k(probs_LBTE, num_experts_per_tok)
  counts_LBTE = jnp.sum(jax.nn.one_hot(ids_LBTk, E, dtype=f32), axis=-2)
  w_BT = jnp.ones((B, T), f32) if attention_mask is None else attention_mask.astype(f32)
  w_LBT1 = jnp.broadcast_to(w_BT, (L, B, T))[..., None]
  if per_layer:
    rows_L = jnp.sum(w_BT)
    f_LE = jnp.sum(counts_LBTE * w_LBT1, axis=(1, 2)) / rows_L
    P_LE = jnp.sum(probs_LBTE * w_LBT1, axis=(1, 2)) / rows_L
    return E * jnp.mean(jnp.sum(f_LE * P_LE, axis=-1))
  rows = L * jnp.sum(w_BT)
  f_E = jnp.sum(counts_LBTE * w_LBT1, axis=(0, 1, 2)) / rows
  P_E = jnp.sum(probs_LBTE * w_LBT1, axis=(0, 1, 2)) / rows
  return E * jnp.sum(f_E * P_E)


def router_z_loss(router_logits, attention_mask=None) -> jax.Array:
  """ST-MoE's router z-loss: mean over layers and real tokens of logsumexp(logits)^2."""
  L, B, T, _ = router_logits.shape
  z_LBT = jax.nn.logsumexp(router_logits.astype(f32), axis=-1) ** 2
  w_BT = jnp.ones((B, T), f32) if attention_mask is None else attention_mask.astype(f32)
  return jnp.sum(z_LBT * w_BT) / (L * jnp.maximum(jnp.sum(w_BT), 1.0))


# ------------------------------------------------------------------------ fused LM head + cross-entropy


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lm_head_cross_entropy(h_BTD, head_DV, targets_BT, weights_BT, chunk: int, dtype) -> jax.Array:
  """sum_{b,t} weights * -log softmax(h @ head)[target], never holding more than a chunk of logits.

  The [B, T, V] logits of a whole batch are the largest tensor of a small-model step (8 x 256 x 32000
  floats = 262 MB, written and read several times by a plain log-softmax and its gradient). Instead a
  scan walks the sequence in chunks of ``chunk`` positions; each chunk computes its logits
  ([B, chunk, V], float32 accumulation of ``dtype`` operands), their log-sum-exp, the target's logit, and,
  in the same pass, the gradient: dlogits = w * (softmax - onehot(target)), dh = dlogits @ head^T,
  dhead += h^T @ dlogits. The backward pass only scales these by the incoming cotangent, so the head
  matmul runs three times per step (forward, dh, dhead) instead of four with recomputation, and the
  logits never reach memory whole. When the head is not differentiated (LoRA's frozen base), dhead is
  not computed: two head matmuls per step.
  """
  return _ce_scan(h_BTD, head_DV, targets_BT, weights_BT, chunk, dtype, with_grad=False)[0]


def _ce_fwd(h_BTD, head_DV, targets_BT, weights_BT, chunk, dtype):
  """``symbolic_zeros``: args arrive as (value, perturbed) records; dhead only for a differentiated head."""
  with_dhead = head_DV.perturbed
  h_BTD, head_DV, targets_BT, weights_BT = (a.value for a in (h_BTD, head_DV, targets_BT, weights_BT))
  nll, (dh_BTD, dhead_DV) = _ce_scan(h_BTD, head_DV, targets_BT, weights_BT, chunk, dtype, with_grad=True,
                                     with_dhead=with_dhead)
  return nll, (dh_BTD, dhead_DV)


def _ce_scan(h_BTD, head_DV, targets_BT, weights_BT, chunk, dtype, *, with_grad: bool, with_dhead: bool = True):
  """Forward (and, ``with_grad``, the gradient) of the chunked loss; see lm_head_cross_entropy."""
  B, T, D = h_BTD.shape
  c = min(chunk, T)
  if T % c:
    raise ValueError(f"sequence length {T} is not a multiple of the cross-entropy chunk {c}")
  n = T // c
  head = head_DV.astype(dtype)
  split = lambda a: jnp.swapaxes(a.reshape(B, n, c, *a.shape[2:]), 0, 1)  # [B, T, ...] -> [n, B, c, ...]
  xs = (split(h_BTD.astype(dtype)), split(targets_BT), split(weights_BT.astype(f32)))

  def body(dhead_DV, x):
    h_BcD, t_Bc, w_Bc = x
    logits_BcV = jnp.einsum("bcd,dv->bcv", h_BcD, head, preferred_element_type=f32)
    lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    target_Bc = jnp.take_along_axis(logits_BcV, t_Bc[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse_Bc - target_Bc) * w_Bc)
    if not with_grad:
      return dhead_DV, (nll, None)
    onehot_BcV = jax.nn.one_hot(t_Bc, logits_BcV.shape[-1], dtype=f32)
    dlogits_BcV = ((jnp.exp(logits_BcV - lse_Bc[..., None]) - onehot_BcV) * w_Bc[..., None]).astype(dtype)
    dh_BcD = jnp.einsum("bcv,dv->bcd", dlogits_BcV, head, preferred_element_type=f32)
    if with_dhead:
      dhead_DV = dhead_DV + jnp.einsum("bcd,bcv->dv", h_BcD, dlogits_BcV, preferred_element_type=f32)
    return dhead_DV, (nll, dh_BcD.astype(h_BTD.dtype))

  dhead0 = jnp.zeros(head_DV.shape if with_grad and with_dhead else (), f32)
  dhead_DV, (nll_n, dh_nBcD) = jax.lax.scan(body, dhead0, xs)
  if not with_grad:
    return jnp.sum(nll_n), None
  dh_BTD = jnp.swapaxes(dh_nBcD, 0, 1).reshape(B, T, D)
  return jnp.sum(nll_n), (dh_BTD, dhead_DV.astype(head_DV.dtype) if with_dhead else None)


def _ce_bwd(chunk, dtype, saved, g):
  dh_BTD, dhead_DV = saved
  dhead = None if dhead_DV is None else dhead_DV * g.astype(dhead_DV.dtype)
  return (dh_BTD * g.astype(dh_BTD.dtype), dhead, None, None)


lm_head_cross_entropy.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)
