"""Remat policies (``mixtral_jax.model.REMAT_POLICIES``): every policy computes the same loss and
gradients as ``full`` (the reference: full recomputation, itself checked against ``none`` in
test_model), run jitted on CPU, whose devices have pinned host memory, so ``offload`` really moves its
activations to host and back; bad names and offload without host memory are refused in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.model import REMAT_POLICIES, remat_policy

CFG = mixtral_jax.get_config("tiny", vocab_size=256, num_hidden_layers=2, moe_block=16)


X = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)), jnp.int32)


def _grad_fn(remat):
  graph, params = nnx.split(mixtral_jax.Mixtral(CFG.replace(remat=remat), rngs=nnx.Rngs(3)))

  def loss(params):
    logits, aux = nnx.merge(graph, params)(X, return_router_logits=True)
    return jnp.mean(logits ** 2) + jnp.mean(aux["router_logits"] ** 2)
  return jax.value_and_grad(loss), params


@pytest.fixture(scope="module")
def full():
  fn, params = _grad_fn("full")
  return jax.jit(fn)(params)


@pytest.mark.parametrize("remat", ["save_projections", "save_attn_moe_in", "offload"])
def test_policy_equals_full(remat, full):
  fn, params = _grad_fn(remat)
  v, g = jax.jit(fn)(params)
  v_ref, g_ref = full
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref)):
    np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7, err_msg=str(path))
  # What the backward keeps: offload's residuals live in host memory (typed f32<host> in the jaxpr;
  # XLA:CPU then drops the placement, host and device memory being one), the others keep none there.
  jaxpr = str(jax.make_jaxpr(fn)(params))
  assert ("<host>" in jaxpr) == (remat == "offload")


def test_bad_policy_names_and_offload_without_host_memory():
  with pytest.raises(ValueError, match=r"remat 'half': no such policy; choose one of none, save_projections"):
    remat_policy("half")
  assert remat_policy("full") is REMAT_POLICIES["full"]

  class NoHost:
    platform = "gpu"

    def addressable_memories(self):
      raise NotImplementedError

  with pytest.raises(ValueError, match=r"remat 'offload' needs pinned host memory, which gpu devices lack"):
    remat_policy("offload", [NoHost()])
  remat_policy("offload", jax.devices())  # CPU devices have pinned_host
