"""Model-level properties: causality, scan == unrolled loop, masks, dtypes, sharded creation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.sharding import make_mesh

CFG = mixtral_jax.get_config("tiny", vocab_size=512, num_hidden_layers=3, moe_block=16)


@pytest.fixture(scope="module")
def model():
  return mixtral_jax.Mixtral(CFG, rngs=nnx.Rngs(0))


def ids(seed, B=2, T=24):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


@pytest.mark.slow
def test_logits_shape_and_dtype(model):
  logits, aux = model(ids(0), return_router_logits=True)
  assert logits.shape == (2, 24, CFG.vocab_size) and logits.dtype == jnp.float32
  assert aux["router_logits"].shape == (CFG.num_hidden_layers, 2, 24, CFG.num_local_experts)
  assert aux["load"].shape == (CFG.num_hidden_layers, CFG.num_local_experts)
  np.testing.assert_allclose(np.asarray(aux["load"]).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.slow
def test_causality(window):
  """Logits at position t do not change when tokens after t change (also through the MoE: routing is
  per token, and dropless dispatch has no capacity coupling between tokens)."""
  m = mixtral_jax.Mixtral(CFG.replace(sliding_window=window), rngs=nnx.Rngs(1))
  a = ids(1)
  t = 13
  b = a.at[:, t + 1:].set(ids(2)[:, t + 1:])
  la, lb = m(a), m(b)
  np.testing.assert_allclose(np.asarray(la[:, :t + 1]), np.asarray(lb[:, :t + 1]), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(la[:, t + 1:] - lb[:, t + 1:])).max() > 1e-3  # the change is visible later on


@pytest.mark.slow
def test_sliding_window_limits_the_receptive_field():
  """With window W and L layers, position t sees back to t - L*(W-1) at most: an earlier change is invisible."""
  W, L = 3, CFG.num_hidden_layers
  m = mixtral_jax.Mixtral(CFG.replace(sliding_window=W), rngs=nnx.Rngs(2))
  a = ids(3)
  b = a.at[:, 0].set((a[:, 0] + 1) % CFG.vocab_size)
  la, lb = m(a), m(b)
  horizon = L * (W - 1)
  np.testing.assert_allclose(np.asarray(la[:, horizon + 1:]), np.asarray(lb[:, horizon + 1:]), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(la[:, 1] - lb[:, 1])).max() > 1e-4


@pytest.mark.slow
def test_scan_equals_unrolled_loop(model):
  x = ids(4)
  h_scan, aux_scan = model.hidden(x)
  h_loop, aux_loop = model.hidden(x, unroll=True)
  np.testing.assert_allclose(np.asarray(h_scan), np.asarray(h_loop), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(aux_scan["router_logits"]), np.asarray(aux_loop["router_logits"]),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_remat_does_not_change_gradients():
  x = ids(5)

  def grads(remat):
    m = mixtral_jax.Mixtral(CFG.replace(remat=remat), rngs=nnx.Rngs(3))
    return nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)

  g0, g1 = grads("none"), grads("full")
  for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
    np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7, err_msg=str(path))


@pytest.mark.slow
def test_padding_mask_hides_pad_tokens(model):
  """Left padding: real tokens' logits equal those of the unpadded sequence run with the same positions."""
  x = ids(6, B=1, T=10)
  pad = 4
  padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), x], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 10), jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  lp = model(padded, attention_mask=mask, positions=positions)
  np.testing.assert_allclose(np.asarray(lp[:, pad:]), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_segment_ids_isolate_packed_documents(model):
  a, b = ids(7, B=1, T=9), ids(8, B=1, T=7)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[0] * 9 + [1] * 7])
  pos = jnp.asarray([list(range(9)) + list(range(7))])
  lp = model(packed, segment_ids=seg, positions=pos)
  np.testing.assert_allclose(np.asarray(lp[:, :9]), np.asarray(model(a)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lp[:, 9:]), np.asarray(model(b)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bf16_compute_with_fp32_params_stays_close():
  m32 = mixtral_jax.Mixtral(CFG, rngs=nnx.Rngs(4))
  m16 = mixtral_jax.Mixtral(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(4))
  assert nnx.state(m16, nnx.Param)["embed_VD"][...].dtype == jnp.float32  # params stay fp32
  x = ids(9)
  assert m16.embed(x).dtype == jnp.bfloat16  # activations really run in bf16
  l32, l16 = m32(x), m16(x)
  assert l16.dtype == jnp.float32
  # bf16 keeps ~3 significant digits; a near-tied expert choice may flip, so compare the whole
  # distribution of logits rather than the worst element.
  corr = np.corrcoef(np.asarray(l32).ravel(), np.asarray(l16).ravel())[0, 1]
  assert corr > 0.99


def test_bf16_params():
  m = mixtral_jax.Mixtral(CFG.replace(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(5))
  assert nnx.state(m, nnx.Param)["blocks"]["moe"]["w1_EDF"][...].dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(m(ids(10)))))


@pytest.mark.slow
def test_capacity_drop_changes_only_overflowing_tokens():
  """With a generous capacity the dropping path equals dropless; with a tight one some tokens differ."""
  x = ids(11)
  base = mixtral_jax.Mixtral(CFG, rngs=nnx.Rngs(6))
  state = nnx.state(base)
  for cf, same in ((8.0, True), (0.25, False)):
    m = nnx.merge(nnx.graphdef(mixtral_jax.Mixtral(CFG.replace(capacity_factor=cf), rngs=nnx.Rngs(0))), state)
    lg, aux = m(x, return_router_logits=True)
    close = np.allclose(np.asarray(lg), np.asarray(base(x)), rtol=1e-5, atol=1e-5)
    assert close == same
    assert (float(jnp.max(aux["dropped"])) == 0.0) == same


@pytest.mark.slow
def test_sharded_creation_places_every_parameter():
  mesh = make_mesh("fsdp=2,tensor=2,data=2")
  m = mixtral_jax.create_model(CFG, seed=7, mesh=mesh)
  w1 = nnx.state(m, nnx.Param)["blocks"]["moe"]["w1_EDF"][...]
  assert w1.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")
  head = nnx.state(m, nnx.Param)["head_DV"][...]
  assert head.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  ref = mixtral_jax.create_model(CFG, seed=7)
  x = ids(12, B=8)
  with jax.set_mesh(mesh):
    sharded_logits = jax.jit(lambda m, x: m(x))(m, x)
  np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)
