"""Grouped expert FFN kernels against a float64 NumPy reference, and the blocked kernel's hand-written
VJP against autodiff of the dense einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import experts


def np_ffn(x, w1, w3, w2):
  a1, a3 = x @ w1, x @ w3
  return ((a1 / (1 + np.exp(-a1))) * a3) @ w2


def make(seed=0, E=4, D=16, F=24, M=70):
  r = np.random.default_rng(seed)
  x = r.normal(size=(M, D))
  w1, w3 = r.normal(size=(E, D, F)) / 4, r.normal(size=(E, D, F)) / 4
  w2 = r.normal(size=(E, F, D)) / 4
  return x, w1, w3, w2


def grouped_reference(x, starts, sizes, w1, w3, w2):
  E = w1.shape[0]
  per = len(starts) // E
  y = np.zeros_like(x)
  for g, (s, n) in enumerate(zip(starts, sizes)):
    e = g // per
    y[s:s + n] = np_ffn(x[s:s + n], w1[e], w3[e], w2[e])
  return y


@pytest.mark.parametrize("block", [1, 8, 32, 128])
def test_blocked_contiguous_groups(block):
  x, w1, w3, w2 = make()
  sizes = np.array([20, 0, 33, 9])  # 62 of 70 rows covered; rows past the groups must be zero
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  y = experts.grouped_expert_ffn(*(jnp.asarray(a, jnp.float32) for a in (x,)), jnp.asarray(starts),
                                 jnp.asarray(sizes), *(jnp.asarray(w, jnp.float32) for w in (w1, w3, w2)),
                                 impl="blocked", block=block)
  np.testing.assert_allclose(np.asarray(y), grouped_reference(x, starts, sizes, w1, w3, w2), rtol=2e-5, atol=2e-5)


def test_blocked_bucket_layout_with_several_groups_per_expert():
  x, w1, w3, w2 = make(1, E=2, M=48)
  C = 8  # 6 buckets of capacity 8 (2 experts x 3 sources), partly filled
  sizes = np.array([8, 3, 0, 5, 8, 1])
  starts = np.arange(6) * C
  y = experts.grouped_expert_ffn(jnp.asarray(x, jnp.float32), jnp.asarray(starts), jnp.asarray(sizes),
                                 *(jnp.asarray(w, jnp.float32) for w in (w1, w3, w2)), impl="blocked", block=4)
  np.testing.assert_allclose(np.asarray(y), grouped_reference(x, starts, sizes, w1, w3, w2), rtol=2e-5, atol=2e-5)


def test_ragged_matches_reference():
  x, w1, w3, w2 = make(2)
  sizes = np.array([10, 25, 0, 30])
  y = experts.ragged_expert_ffn(jnp.asarray(x, jnp.float32), jnp.asarray(sizes, jnp.int32),
                                *(jnp.asarray(w, jnp.float32) for w in (w1, w3, w2)))
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  np.testing.assert_allclose(np.asarray(y), grouped_reference(x, starts, sizes, w1, w3, w2), rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_blocked_vjp_matches_autodiff_of_dense():
  """Gradients of sum(y * c) through the custom VJP equal autodiff through per-row dense maths."""
  x, w1, w3, w2 = (jnp.asarray(a, jnp.float32) for a in make(3, M=50))
  sizes = np.array([12, 0, 21, 11])
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  owner = np.repeat(np.arange(4), sizes)
  owner = jnp.asarray(np.concatenate([owner, np.full(50 - len(owner), -1)]))
  c = jnp.asarray(np.random.default_rng(4).normal(size=(50, 16)), jnp.float32)

  def blocked(x, w1, w3, w2):
    y = experts.blocked_expert_ffn(x, jnp.asarray(starts), jnp.asarray(sizes), w1, w3, w2, 8)
    return jnp.sum(y * c)

  def dense(x, w1, w3, w2):
    onehot = jax.nn.one_hot(owner, 4)  # rows owned by no expert contribute nothing
    a1 = jnp.einsum("md,edf->mef", x, w1)
    a3 = jnp.einsum("md,edf->mef", x, w3)
    y = jnp.einsum("mef,efd,me->md", jax.nn.silu(a1) * a3, w2, onehot)
    return jnp.sum(y * c)

  g_blocked = jax.grad(blocked, argnums=(0, 1, 2, 3))(x, w1, w3, w2)
  g_dense = jax.grad(dense, argnums=(0, 1, 2, 3))(x, w1, w3, w2)
  for a, b in zip(g_blocked, g_dense):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
