"""The one projection (mixtral_jax.projection) and the one registry of parameter paths (mixtral_jax.param_paths).

References: a float64 NumPy recomputation of x W (+ the LoRA term), the previous implementation's literal
tables (state paths, quantization sites, LoRA layouts), and the registry-derived key maps against the
hand-written transforms they replaced.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import param_paths
from mixtral_jax.config import get_config
from mixtral_jax.inference.quantize import SITE_AXES, quantize
from mixtral_jax.lora import LoraSection, merge, spec
from mixtral_jax.lora.adapters import LAYOUT, LoRAParam, adapter_key
from mixtral_jax.model import Mixtral
from mixtral_jax.params import abstract_model

CFG = get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, dtype="float32",
                 param_dtype="float32")

# The state tree written by every checkpoint before the projection existed (key -> shape): it must not move.
OLD_PATHS = {
    ("embed_VD",): (64, 32), ("head_DV",): (32, 64), ("final_norm", "scale"): (32,),
    ("blocks", "attn_norm", "scale"): (2, 32), ("blocks", "moe_norm", "scale"): (2, 32),
    ("blocks", "attn", "q_DNH"): (2, 32, 4, 8), ("blocks", "attn", "k_DKH"): (2, 32, 2, 8),
    ("blocks", "attn", "v_DKH"): (2, 32, 2, 8), ("blocks", "attn", "o_NHD"): (2, 4, 8, 32),
    ("blocks", "moe", "router_DE"): (2, 32, 8), ("blocks", "moe", "w1_EDF"): (2, 8, 32, 48),
    ("blocks", "moe", "w3_EDF"): (2, 8, 32, 48), ("blocks", "moe", "w2_EFD"): (2, 8, 48, 32),
}
# The quantization sites as inference/quantize.py spelled them before the registry.
OLD_SITE_AXES = {
    ("blocks", "attn", "q_DNH"): (-3,), ("blocks", "attn", "k_DKH"): (-3,), ("blocks", "attn", "v_DKH"): (-3,),
    ("blocks", "attn", "o_NHD"): (-3, -2), ("blocks", "moe", "w1_EDF"): (-2,), ("blocks", "moe", "w3_EDF"): (-2,),
    ("blocks", "moe", "w2_EFD"): (-2,), ("head_DV",): (-2,),
}


def _flat(state):
  return {tuple(str(p) for p in k): v for k, v in nnx.to_flat_state(state)}


def test_state_tree_is_unchanged_and_matches_the_registry():
  flat = _flat(nnx.state(abstract_model(CFG), nnx.Param))
  assert {k: tuple(v.shape) for k, v in flat.items()} == OLD_PATHS
  assert set(flat) == set(param_paths.BY_KEY)
  for key, var in flat.items():
    w = param_paths.BY_KEY[key]
    stacked = ("layers",) if key[0] == "blocks" else ()
    assert tuple(var.get_metadata()["logical_axes"]) == stacked + w.axes, key
    assert var.shape[len(stacked):] == param_paths.shape(w, CFG), key


def test_quantization_sites_and_int8_tree():
  assert SITE_AXES == OLD_SITE_AXES
  flat = _flat(nnx.state(abstract_model(CFG, "int8"), nnx.Param))
  scales = {k[:-1] + (k[-1].removesuffix("_scale"),) for k in flat if k[-1].endswith("_scale")}
  assert scales == set(OLD_SITE_AXES)


def test_lora_layout_and_keys():
  assert LAYOUT["o"] == ((("N", "heads"), ("H", "head_dim"), ("r", "lora_rank")), (("r", "lora_rank"), ("D", "embed")))
  assert LAYOUT["w2"] == ((("E", "experts"), ("F", "expert_mlp"), ("r", "lora_rank")),
                          (("E", "experts"), ("r", "lora_rank"), ("D", "expert_embed")))
  lora = LoraSection(rank=2, targets=tuple(LAYOUT))
  model = nnx.eval_shape(lambda: Mixtral(CFG, rngs=nnx.Rngs(0), lora_cfg=lora))
  flat = _flat(nnx.state(model, LoRAParam))
  assert set(flat) == {adapter_key(t, f) for t in LAYOUT for f in "AB"}
  assert param_paths.lora_keys()["lm_head"] == ("head_DV",)
  # lora/merge.py still spells its own tables; until it reads these, they must agree.
  assert merge.PARAM_KEYS == param_paths.lora_keys()
  assert all(merge.adapter_key(t, f) == adapter_key(t, f) for t in LAYOUT for f in "AB")
  assert set(spec.TARGETS) == set(LAYOUT)


def _np(a):
  return np.asarray(a, np.float64)


@pytest.mark.slow
def test_projection_equals_numpy_float_int8_and_lora():
  """attn.q(x) / attn.o(x) / model.head against x W (+ (x A) B alpha/r) in float64 NumPy."""
  lora = LoraSection(rank=2, alpha=4.0, targets=("q", "o", "lm_head"))
  model = Mixtral(CFG, rngs=nnx.Rngs(0), lora_cfg=lora)
  rng = np.random.default_rng(0)
  for k, v in _flat(nnx.state(model, LoRAParam)).items():  # nonzero adapters, so the LoRA term counts
    v.set_value(jnp.asarray(rng.normal(size=v.shape), jnp.float32))
  x_BTD = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.float32)
  attn = nnx.merge(*_layer0(model.blocks.attn))
  w_q, w_o = _np(attn.q_DNH[...]), _np(attn.o_NHD[...])
  a, b = _np(attn.lora.q_A[...]), _np(attn.lora.q_B[...])
  want = np.einsum("btd,dnh->btnh", _np(x_BTD), w_q) + np.einsum("btd,dr,rnh->btnh", _np(x_BTD), a, b) * 2.0
  np.testing.assert_allclose(attn.q(x_BTD), want, rtol=1e-5, atol=1e-5)
  x_BTNH = jnp.asarray(rng.normal(size=(2, 3, 4, 8)), jnp.float32)
  a, b = _np(attn.lora.o_A[...]), _np(attn.lora.o_B[...])
  want = np.einsum("btnh,nhd->btd", _np(x_BTNH), w_o) + np.einsum("btnh,nhr,rd->btd", _np(x_BTNH), a, b) * 2.0
  np.testing.assert_allclose(attn.o(x_BTNH), want, rtol=1e-5, atol=1e-5)
  assert attn.k(x_BTD).shape == (2, 3, 2, 8)  # not adapted: x W only
  np.testing.assert_allclose(attn.k(x_BTD), np.einsum("btd,dkh->btkh", _np(x_BTD), _np(attn.k_DKH[...])),
                             rtol=1e-5, atol=1e-5)

  quantize(model)  # int8 storage: the projection dequantises Q * s
  attn = nnx.merge(*_layer0(model.blocks.attn))
  w_q = _np(attn.q_DNH[...]) * _np(attn.q_DNH_scale[...])
  a, b = _np(attn.lora.q_A[...]), _np(attn.lora.q_B[...])
  want = np.einsum("btd,dnh->btnh", _np(x_BTD), w_q) + np.einsum("btd,dr,rnh->btnh", _np(x_BTD), a, b) * 2.0
  np.testing.assert_allclose(attn.q(x_BTD), want, rtol=1e-5, atol=1e-5)
  h, w = model.head_operands(x_BTD)  # the head's adapter folded into the fused cross-entropy's operands
  w_head = _np(model.head_DV[...]) * _np(model.head_DV_scale[...])
  want = _np(x_BTD) @ w_head + (_np(x_BTD) @ _np(model.lora_head.lm_head_A[...])) @ _np(
      model.lora_head.lm_head_B[...]) * 2.0
  np.testing.assert_allclose(jnp.einsum("btd,dv->btv", h, w), want, rtol=1e-4, atol=1e-4)


def _layer0(stacked):
  graphdef, state = nnx.split(stacked)
  return graphdef, jax.tree.map(lambda a: a[0], state)


def test_hf_rules_match_the_hand_written_transforms():
  """The registry-derived HF rules against the per-weight transforms hf.py spelled before (Hub layout)."""
  from mixtral_jax.checkpoint import consolidated, hf  # noqa: PLC0415

  D, N, K, H = 32, 4, 2, 8
  rules = {r.key: r for r in hf.rules(CFG, ["model.layers.0.block_sparse_moe.experts.0.w1.weight"])}
  rng = np.random.default_rng(1)
  q = rng.normal(size=(N * H, D))
  np.testing.assert_array_equal(rules[("blocks", "attn", "q_DNH")].to_ours(q), q.reshape(N, H, D).transpose(2, 0, 1))
  o = rng.normal(size=(D, N * H))
  np.testing.assert_array_equal(rules[("blocks", "attn", "o_NHD")].to_ours(o), o.reshape(D, N, H).transpose(1, 2, 0))
  assert rules[("blocks", "moe", "w2_EFD")].name == "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight"
  fused = {r.key: r for r in hf.rules(CFG, ["model.layers.0.mlp.experts.gate_up_proj"])}
  gu = rng.normal(size=(8, 96, D))
  np.testing.assert_array_equal(fused[("blocks", "moe", "w3_EDF")].to_ours(gu), gu[:, 48:].transpose(0, 2, 1))
  k = rng.normal(size=(K * H, D))
  want = k.reshape(K, H // 2, 2, D).transpose(3, 0, 2, 1).reshape(D, K, H)  # interleaved RoPE rows
  crules = {r.key: r for r in consolidated.rules(CFG)}
  np.testing.assert_array_equal(crules[("blocks", "attn", "k_DKH")].to_ours(k), want)


def test_model_does_not_import_inference():
  """The model's modules import nothing from mixtral_jax.inference (the storage forms live in mixtral_jax.quant)."""
  root = pathlib.Path(mixtral_jax.__file__).parent
  for name in ("model", "attention", "moe", "layers", "projection", "quant", "param_paths"):
    tree = ast.parse((root / f"{name}.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("mixtral_jax.inference")], (name, imported)
