"""int8 weight-only quantization against NumPy: the rounding rule, every matmul site using the
dequantised weight (full forward and the per-expert CPU decode path), and the 8x7B int8 footprint from
abstract shapes. (Quality on a trained model: benchmarks/quantize_quality.py, docs/benchmarks.md.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.generate import generate
from mixtral_jax.inference.quantize import SITES, quantize, quantize_array, weight_bytes
from mixtral_jax.params import abstract_model


def np_quantize(w, axes):
  """The rule in float32, as specified (a float64 scale would round some entries on the other side)."""
  w = w.astype(np.float32)
  amax = np.max(np.abs(w), axis=axes, keepdims=True)
  scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
  return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def test_quantize_array_matches_numpy():
  w = np.random.RandomState(0).randn(3, 16, 5).astype(np.float32)
  w[1, :, 2] = 0.0  # an all-zero output channel keeps scale 1 and quantizes to 0
  q, s = (np.asarray(a) for a in quantize_array(jnp.asarray(w), (-2,)))
  q_ref, s_ref = np_quantize(w, (-2,))
  np.testing.assert_allclose(s, s_ref, rtol=1e-7)
  # XLA may divide as a multiply by the reciprocal, which can move an entry within 1e-6 of a .5 tie
  # to the other side: allow exactly those.
  off = q.astype(int) != q_ref
  assert np.all(np.abs(np.abs(w / s_ref - np.trunc(w / s_ref)) - 0.5)[off] < 1e-5)
  assert np.all(np.abs(q * s - w) <= s_ref * (0.5 + 1e-4))
  assert q.min() >= -127 and np.abs(q).max() == 127 and q.dtype == np.int8


@pytest.fixture(scope="module")
def pair():
  """(int8 model, float model whose weights are the int8 model's values times its scales, in NumPy)."""
  cfg = mixtral_jax.get_config("tiny", vocab_size=512)
  qmodel = quantize(mixtral_jax.create_model(cfg, seed=1))
  ref = mixtral_jax.create_model(cfg, seed=1)
  for path, name, axes in SITES:
    mq, mr = qmodel, ref
    for p in path:
      mq, mr = getattr(mq, p), getattr(mr, p)
    q, s = np.asarray(getattr(mq, name)[...]), np.asarray(getattr(mq, name + "_scale")[...])
    assert s.shape == tuple(1 if i - q.ndim in axes else n for i, n in enumerate(q.shape))
    w = np.asarray(getattr(mr, name)[...])
    assert np.all(np.abs(q * s - w) <= s * (0.5 + 1e-4))  # the int8 model rounds this float model's weight
    getattr(mr, name)[...] = jnp.asarray(q.astype(np.float32) * s)
  return qmodel, ref


@pytest.mark.slow
def test_every_site_uses_the_dequantised_weight(pair):
  qmodel, ref = pair
  assert qmodel.blocks.moe.w1_EDF[...].dtype == jnp.int8 and qmodel.head_DV[...].dtype == jnp.int8
  assert qmodel.blocks.moe.router_DE[...].dtype == jnp.float32  # the router stays (see quantize.py)
  ids = np.random.RandomState(2).randint(0, 512, (2, 24))
  np.testing.assert_allclose(np.asarray(qmodel(ids)), np.asarray(ref(ids)), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_quantized_decode_path_matches(pair):
  """generate's single-device decode reads per-expert (int8, scale) views: same tokens as the float model."""
  qmodel, ref = pair
  prompts = [[1, 5, 9, 200]]
  assert generate(qmodel, prompts, 8, eos_id=None).tokens == generate(ref, prompts, 8, eos_id=None).tokens


def test_8x7b_int8_footprint_from_abstract_shapes():
  cfg = mixtral_jax.get_config("mixtral-8x7b", param_dtype="bfloat16", dtype="bfloat16")
  abstract = abstract_model(cfg, "int8")
  assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(abstract)))  # nothing allocated
  V, D, L, N, K, H, F, E = 32000, 4096, 32, 32, 8, 128, 14336, 8
  quantized = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * E * D * F) + D * V
  kept = V * D + L * (D * E + 2 * D) + D  # embedding, router, norms (bf16)
  scales = L * (N * H + 2 * K * H + D + E * (2 * F + D)) + V  # float32
  assert quantized + kept == mixtral_jax.param_counts(cfg)[0]
  assert weight_bytes(abstract) == quantized + 2 * kept + 4 * scales
  assert weight_bytes(abstract) / 2**30 < 44  # vs 87 GiB in bf16


@pytest.mark.slow
def test_plan_generate_int8_weights():
  """plan --generate --quantize int8 compiles prefill and decode on int8 weights sharded on a mesh."""
  from mixtral_jax.sharding import make_mesh
  from mixtral_jax.train.plan.serving import plan_serving

  cfg = mixtral_jax.get_config("tiny", num_hidden_layers=2, vocab_size=512)
  out = plan_serving(cfg, make_mesh("tensor=2,expert=4"), batch=4, context=64, weights="int8")
  whole = weight_bytes(abstract_model(cfg.replace(param_dtype="bfloat16"), "int8"))
  assert whole / 8 <= out["param_bytes"] <= whole / 2 and out["weights"] == "int8"
  assert whole < 2 * mixtral_jax.param_counts(cfg)[0] * 0.7  # well under bf16's bytes
  for name in ("prefill", "decode"):
    assert out[name]["argument_bytes"] >= out["param_bytes"] + out["kv_cache_bytes"]
