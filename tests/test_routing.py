"""Routing maths against float64 NumPy re-computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import routing


def np_route(logits, k):
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
  w = np.take_along_axis(p, ids, -1)
  return w / w.sum(-1, keepdims=True), ids


@pytest.mark.parametrize("k, E", [(1, 4), (2, 8), (3, 8)])
def test_top_k_route_matches_numpy(k, E):
  logits = np.random.default_rng(k).normal(size=(50, E)).astype(np.float32) * 3
  w, ids = routing.top_k_route(jnp.asarray(logits), k)
  w_ref, ids_ref = np_route(logits, k)
  np.testing.assert_array_equal(np.asarray(ids), ids_ref)
  np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


def test_softmax_is_float32_even_for_bf16_logits():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.bfloat16)
  assert routing.router_probs(logits).dtype == jnp.float32
  assert routing.top_k_route(logits, 2)[0].dtype == jnp.float32


def test_expert_ranks_follow_position_priority():
  ids = np.array([[0, 1], [1, 2], [0, 1], [3, 0], [1, 0]])
  rank, counts = routing.expert_ranks(jnp.asarray(ids), 4)
  # pairs in priority order: (t0:0,1) (t1:1,2) (t2:0,1) (t3:3,0) (t4:1,0)
  expect = np.array([[0, 0], [1, 0], [1, 2], [0, 2], [3, 3]])
  np.testing.assert_array_equal(np.asarray(rank), expect)
  np.testing.assert_array_equal(np.asarray(counts), [4, 4, 1, 1])


def test_expert_ranks_random_against_loop():
  rng = np.random.default_rng(1)
  ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(64)])
  rank, counts = routing.expert_ranks(jnp.asarray(ids), 8)
  seen = np.zeros(8, int)
  expect = np.zeros_like(ids)
  for n in range(ids.shape[0]):
    for j in range(ids.shape[1]):
      expect[n, j] = seen[ids[n, j]]
      seen[ids[n, j]] += 1
  np.testing.assert_array_equal(np.asarray(rank), expect)
  np.testing.assert_array_equal(np.asarray(counts), seen)


def test_sort_by_expert_groups_are_contiguous_and_stable():
  ids = np.random.default_rng(2).integers(0, 8, size=(40, 2))
  order, counts, starts = (np.asarray(a) for a in routing.sort_by_expert(jnp.asarray(ids), 8))
  flat = ids.reshape(-1)
  assert (np.diff(flat[order]) >= 0).all()
  for e in range(8):
    grp = order[starts[e]:starts[e] + counts[e]]
    assert (flat[grp] == e).all() and (np.diff(grp) > 0).all()


def test_capacity():
  assert routing.capacity(2048, 2, 8, None) == 2048
  assert routing.capacity(2048, 2, 8, 1.25) == 640
  assert routing.capacity(3, 2, 8, 1.0) == 1


def test_load_fractions_mask_padding():
  ids = jnp.asarray([[0, 1], [2, 3], [0, 0]])
  frac = routing.load_fractions(ids, 4, jnp.asarray([1, 1, 0]))
  np.testing.assert_allclose(np.asarray(frac), [0.25, 0.25, 0.25, 0.25])
