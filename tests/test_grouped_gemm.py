"""The grouped-GEMM expert path (``moe_impl`` triton / mosaic_gpu on GPU) and its guards.

On CPU the GPU kernels cannot run (Triton has no interpreter here), so our code around them (the
custom VJP that traces tokamax's backward under ``cross_compile``, the adapters through the same
grouped matmul, the zeroing of rows past the groups) runs through tokamax's entry point with its
``xla`` kernel, against a float64 NumPy reference and against today's CPU kernel, the blocked
hand-written VJP. Deviceless H100 compiles of the real kernels are in docs/benchmarks.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import experts, grouped_matmul, tokamax_lib
from mixtral_jax.config import MixtralConfig
from mixtral_jax.sharding.expert_parallel import dispatch_mode

E, D, F, M = 4, 16, 24, 60
SIZES = np.array([11, 0, 26, 17])  # 54 of 60 rows in groups: the last 6 must come out zero


def _data(seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(M, D))
  w = [r.normal(size=s) / 4 for s in ((E, D, F), (E, D, F), (E, F, D))]
  return x, w


def _np_grouped(x, w):
  """float64 reference: each contiguous group through its expert, zero past the groups."""
  y = np.zeros_like(x)
  start = 0
  for e, n in enumerate(SIZES):
    a1, a3 = x[start:start + n] @ w[0][e], x[start:start + n] @ w[1][e]
    y[start:start + n] = (a1 / (1 + np.exp(-a1)) * a3) @ w[2][e]
    start += n
  return y


@pytest.mark.slow
def test_tokamax_path_values_and_gradients_match_blocked_and_numpy():
  x, w = _data()
  xj, wj = jnp.asarray(x, jnp.float32), [jnp.asarray(a, jnp.float32) for a in w]
  sizes = jnp.asarray(SIZES, jnp.int32)
  starts = jnp.asarray(np.concatenate([[0], np.cumsum(SIZES)[:-1]]), jnp.int32)
  c = jnp.asarray(np.random.default_rng(1).normal(size=(M, D)), jnp.float32)

  def tokamax_loss(x, w1, w3, w2):
    return jnp.sum(experts.ragged_expert_ffn(x, sizes, w1, w3, w2, kernel="xla") * c)

  def blocked_loss(x, w1, w3, w2):
    return jnp.sum(experts.grouped_expert_ffn(x, starts, sizes, w1, w3, w2, impl="blocked", block=8) * c)

  y = jax.jit(lambda *a: experts.ragged_expert_ffn(a[0], sizes, *a[1:], kernel="xla"))(xj, *wj)
  np.testing.assert_allclose(np.asarray(y), _np_grouped(x, w), rtol=2e-5, atol=2e-5)
  got = jax.jit(jax.grad(tokamax_loss, argnums=(0, 1, 2, 3)))(xj, *wj)
  want = jax.jit(jax.grad(blocked_loss, argnums=(0, 1, 2, 3)))(xj, *wj)
  for g, r in zip(got, want):
    assert np.abs(np.asarray(r)).max() > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)


def test_custom_vjp_matches_tokamax_autodiff_in_bf16():
  """The wrapper's VJP (tokamax's own pullback, re-traced) equals differentiating tokamax directly."""
  tokamax = tokamax_lib.load()
  r = np.random.default_rng(2)
  x = jnp.asarray(r.normal(size=(M, D)), jnp.bfloat16)
  w = jnp.asarray(r.normal(size=(E, D, F)) / 4, jnp.bfloat16)
  sizes = jnp.asarray(SIZES, jnp.int32)
  ours = jax.grad(lambda x, w: jnp.sum(grouped_matmul.grouped_matmul(x, w, sizes, "xla").astype(jnp.float32) ** 2),
                  argnums=(0, 1))(x, w)
  theirs = jax.grad(lambda x, w: jnp.sum(tokamax.ragged_dot(x, w, sizes, precision=jax.lax.Precision.DEFAULT,
                                                            implementation="xla").astype(jnp.float32) ** 2),
                    argnums=(0, 1))(x, w)
  for g, r in zip(ours, theirs):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))


def test_auto_picks_by_the_mesh_platform():
  assert experts.resolve_impl("auto", "gpu") == "triton"
  assert experts.resolve_impl("auto", "tpu") == "ragged"
  assert experts.resolve_impl("auto", "cpu") == "blocked"
  assert experts.grouped_kernel("auto", "gpu") == "triton"
  assert experts.grouped_kernel("ragged", "tpu") == "lax"
  assert dispatch_mode(None, "auto", backend="gpu") == "ragged"
  assert dispatch_mode(None, "ragged", backend="cpu") == "blocked"  # XLA:CPU has no ragged_all_to_all


@pytest.mark.parametrize("call, fix", [
    (lambda: experts.resolve_impl("triton", "cpu"), "moe_impl='auto'"),
    (lambda: experts.resolve_impl("mosaic_gpu", "tpu"), "moe_impl='auto'"),
    (lambda: experts.grouped_kernel("ragged", "gpu"), "moe_impl='auto'"),
    (lambda: dispatch_mode(None, "dense", backend="gpu"), "capacity_factor"),
    (lambda: MixtralConfig(moe_impl="cutlass"), "moe_impl='cutlass' is not one of"),
])
def test_a_kernel_the_platform_cannot_run_is_one_line_naming_the_fix(call, fix):
  with pytest.raises(ValueError) as err:
    call()
  assert fix in str(err.value) and "\n" not in str(err.value)


def test_expansion_is_an_error_not_a_slow_run():
  """lax.ragged_dot on GPU would be a dense dot over every expert: refused with the reason."""
  assert "dense dot over every expert" in grouped_matmul.kernel_problem("lax", "gpu")
  assert grouped_matmul.kernel_problem("triton", "gpu") is None
  assert grouped_matmul.kernel_problem("lax", "tpu") is None


def test_inside_shard_map_outputs_vary_and_invariant_weights_get_summed_gradients():
  """The expert-parallel dispatch calls the kernel inside ``shard_map`` (vma checks on): each device's
  rows through a weight that is replicated (invariant), so its gradient is the sum over devices. Against
  lax.ragged_dot in the same shard_map, where JAX's own transpose rules do that sum."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((4,), ("expert",), devices=jax.devices()[:4])
  r = np.random.default_rng(5)
  x = jnp.asarray(r.normal(size=(4 * M, D)), jnp.float32)
  w = jnp.asarray(r.normal(size=(E, D, F)) / 4, jnp.float32)
  sizes = jnp.asarray(np.tile(SIZES, 4), jnp.int32)

  def loss(kernel):
    def local(x, w, sizes):
      if kernel == "lax":  # lax.ragged_dot wants matching vma: JAX's pcast, whose transpose is the psum
        w = jax.lax.pcast(w, ("expert",), to="varying")
      y = grouped_matmul.grouped_matmul(x, w, sizes, kernel)
      return jax.lax.psum(jnp.sum(jnp.sin(y)), "expert")
    body = jax.shard_map(local, mesh=mesh, in_specs=(P("expert"), P(), P("expert")), out_specs=P())
    return jax.jit(jax.value_and_grad(body, argnums=(0, 1)))

  shard = jax.sharding.NamedSharding(mesh, P("expert"))
  replicated = jax.sharding.NamedSharding(mesh, P())
  x, w, sizes = jax.device_put(x, shard), jax.device_put(w, replicated), jax.device_put(sizes, shard)
  (v, (gx, gw)), (rv, (rgx, rgw)) = loss("xla")(x, w, sizes), loss("lax")(x, w, sizes)
  np.testing.assert_allclose(float(v), float(rv), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rgx), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rgw), rtol=2e-5, atol=2e-5)
