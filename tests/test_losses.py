"""Training losses against independent references: transformers' load_balancing_loss_func, float64 NumPy,
and plain autodiff of an unchunked log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mixtral_jax.train import load_balancing_loss, router_z_loss
from mixtral_jax.train.losses import lm_head_cross_entropy

L, B, T, E = 3, 2, 7, 8


def _logits(seed=0):
  return np.random.default_rng(seed).normal(size=(L, B, T, E)).astype(np.float32) * 2


def _mask():
  m = np.ones((B, T), np.int64)
  m[0, :3] = 0  # left padding
  m[1, -2:] = 0  # right padding
  return m


def _hf(logits, k, mask=None):
  per_layer = tuple(torch.tensor(logits[l].reshape(B * T, E)) for l in range(L))
  out = load_balancing_loss_func(per_layer, E, k, None if mask is None else torch.tensor(mask))
  return float(out)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_matches_transformers(k, masked):
  logits, mask = _logits(k), (_mask() if masked else None)
  ours = float(load_balancing_loss(jnp.asarray(logits), k, None if mask is None else jnp.asarray(mask)))
  assert abs(ours - _hf(logits, k, mask)) <= 1e-6


def _np_balance(logits, k, mask, per_layer):
  p = np.exp(logits.astype(np.float64))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1, kind="stable")[..., :k]
  counts = np.zeros_like(p)
  np.put_along_axis(counts, top, 1.0, axis=-1)
  w = mask.astype(np.float64)[None, ..., None]
  if per_layer:
    f = (counts * w).sum((1, 2)) / w.sum()
    P = (p * w).sum((1, 2)) / w.sum()
    return E * np.mean(np.sum(f * P, -1))
  f = (counts * w).sum((0, 1, 2)) / (L * w.sum())
  P = (p * w).sum((0, 1, 2)) / (L * w.sum())
  return E * np.sum(f * P)


def test_per_layer_mode_and_pooled_against_numpy():
  logits, mask = _logits(3), _mask()
  # Make one layer very unbalanced, so pooling and per-layer averaging differ.
  logits[1, ..., 0] += 6
  pooled = float(load_balancing_loss(jnp.asarray(logits), 2, jnp.asarray(mask)))
  per_layer = float(load_balancing_loss(jnp.asarray(logits), 2, jnp.asarray(mask), per_layer=True))
  np.testing.assert_allclose(pooled, _np_balance(logits, 2, mask, False), rtol=1e-6)
  np.testing.assert_allclose(per_layer, _np_balance(logits, 2, mask, True), rtol=1e-6)
  assert abs(pooled - per_layer) > 1e-2


def test_load_balancing_gradient_flows_through_probabilities_only():
  logits = jnp.asarray(_logits(4))
  g = jax.grad(lambda z: load_balancing_loss(z, 2))(logits)
  # d/dz of E * sum_e f_e * mean softmax_e: f is held constant (top-k counts).
  p = jax.nn.softmax(logits, -1)
  f = jnp.sum(jax.nn.one_hot(jax.lax.top_k(p, 2)[1], E), -2).mean((0, 1, 2))
  ref = jax.grad(lambda z: E * jnp.sum(f * jax.nn.softmax(z, -1).mean((0, 1, 2))))(logits)
  np.testing.assert_allclose(g, ref, atol=1e-7)


def test_router_z_loss_against_numpy():
  logits, mask = _logits(5), _mask()
  x = logits.astype(np.float64)
  lse = np.log(np.exp(x).sum(-1))
  ref = (lse ** 2 * mask[None]).sum() / (L * mask.sum())
  np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits), jnp.asarray(mask))), ref, rtol=1e-6)


@pytest.mark.parametrize("chunk", [4, 16])
def test_fused_cross_entropy_value_and_gradients(chunk):
  rng = np.random.default_rng(0)
  Bc, Tc, D, V = 3, 16, 8, 50
  h = jnp.asarray(rng.normal(size=(Bc, Tc, D)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (Bc, Tc)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (Bc, Tc)), jnp.float32)

  def plain(h, head):
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, head), -1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights)

  fused = lambda h, head: 2.5 * lm_head_cross_entropy(h, head, targets, weights, chunk, jnp.dtype("float32"))
  np.testing.assert_allclose(fused(h, head), 2.5 * plain(h, head), rtol=1e-6)
  g_fused = jax.grad(fused, argnums=(0, 1))(h, head)
  g_plain = jax.grad(lambda a, b: 2.5 * plain(a, b), argnums=(0, 1))(h, head)
  for a, b in zip(g_fused, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
