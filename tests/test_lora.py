"""LoRA (mixtral_jax.lora) against independent references: transformers + peft for adapters in and out
(peft's own forward on a peft-made adapter, and on ours), transformers on the merged export, the
single-device model for per-expert adapters on expert-parallel meshes, and the base model for step 0."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.checkpoint import orbax_io
from mixtral_jax.config import MixtralConfig
from mixtral_jax.lora import TARGETS, LoRAParam, LoraSection, validate
from mixtral_jax.lora import merge as lora_merge
from mixtral_jax.lora.peft_io import write_peft
from mixtral_jax.model import Mixtral
from mixtral_jax.params import param_shardings
from mixtral_jax.sharding import make_mesh
from reference import TINY

CFG = MixtralConfig(**{**TINY, "num_hidden_layers": 2, "intermediate_size": 96}, moe_block=8)
ALL = LoraSection(rank=4, alpha=8.0, targets=TARGETS)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def random_values(model, seed, std=0.05):
  """Adapters with every factor random (B too), so each target changes the output."""
  values = lora_merge.adapter_values(model)
  leaves, treedef = jax.tree.flatten(values)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


def with_random_adapters(base, lora=ALL, seed=3):
  m = lora_merge.attach(base, lora)
  return lora_merge.attach(base, lora, random_values(m, seed))


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("section, words", [
    (LoraSection(rank=0), ["lora.rank=0", "positive"]),
    (LoraSection(rank=-2), ["lora.rank=-2"]),
    (LoraSection(rank=65), ["larger than", "q (64 -> 64)"]),
    (LoraSection(rank=4, targets=("q", "gate_proj")), ["unknown", "gate_proj", "choose from"]),
    (LoraSection(rank=4, dropout=1.0), ["lora.dropout=1.0"]),
])
def test_bad_lora_section_names_the_problem(section, words):
  with pytest.raises(ValueError) as e:
    validate(section, CFG)
  assert all(w in str(e.value) for w in words), str(e.value)


def test_run_config_rejects_bad_lora_before_compiling():
  from mixtral_jax.train.config import load_config
  with pytest.raises(ValueError, match="unknown name"):
    load_config("lora-sft", ["lora.targets=[q, w4]", "model.preset=tiny"])
  assert load_config("lora-sft", ["model.preset=tiny"]).lora.rank == 16


# ------------------------------------------------------------------------------------ model level


@pytest.mark.slow
def test_step0_is_the_base_model_and_adapters_change_it():
  base = Mixtral(CFG, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)
  start = lora_merge.attach(base, ALL)  # B = 0
  fwd = nnx.jit(lambda m, x: m(x))
  assert np.array_equal(np.asarray(fwd(start, ids)), np.asarray(fwd(base, ids)))
  flat = lambda m: {k for k, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
  assert flat(start) == flat(base)  # the adapters are no nnx.Param: the base is the plain model
  moved = with_random_adapters(base)
  assert _rel(fwd(moved, ids), fwd(base, ids)) > 1e-3


def _adapter_loss_grads(graphdef, adapters, base, ids):
  def f(a):
    fresh = lambda s: jax.tree.map(lambda x: x, s)  # noqa: E731 - new Variables at this trace level
    logits = nnx.merge(graphdef, fresh(a), fresh(base))(ids)
    return jnp.sum(jnp.tanh(logits) * jnp.cos(jnp.arange(logits.shape[-1]))), logits
  (_, logits), grads = jax.value_and_grad(f, has_aux=True)(adapters)
  return logits, grads


@pytest.fixture(scope="module")
def single_device_lora():
  """Single device, experts as one batched einsum over buckets large enough that nothing drops."""
  E, k = CFG.num_local_experts, CFG.num_experts_per_tok
  base = Mixtral(CFG.replace(capacity_factor=E / k, moe_impl="dense"), rngs=nnx.Rngs(0))
  graphdef, adapters, base_state = nnx.split(with_random_adapters(base), LoRAParam, ...)
  ids = jax.random.randint(jax.random.key(1), (8, 12), 0, CFG.vocab_size)
  logits, grads = jax.jit(_adapter_loss_grads, static_argnums=0)(graphdef, adapters, base_state, ids)
  return adapters, base_state, ids, logits, grads


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["expert=4", "data=2,expert=4"])
def test_per_expert_adapters_on_expert_meshes_equal_single_device(single_device_lora, mesh_spec):
  adapters, base_state, ids, ref_logits, ref_grads = single_device_lora
  graphdef = nnx.graphdef(lora_merge.attach(Mixtral(CFG, rngs=nnx.Rngs(0)), ALL))  # dropless, blocked
  n = 4 if mesh_spec == "expert=4" else 8
  mesh = make_mesh(mesh_spec, num_experts=CFG.num_local_experts, devices=jax.devices()[:n])
  adapters_sh = jax.device_put(adapters, param_shardings(adapters, mesh))
  base_sh = jax.device_put(base_state, param_shardings(base_state, mesh))
  assert adapters_sh["blocks"]["moe"]["lora"]["w1_A"][...].sharding.spec[1] == "expert"  # with its expert
  with jax.set_mesh(mesh):
    logits, grads = jax.jit(_adapter_loss_grads, static_argnums=0)(graphdef, adapters_sh, base_sh, ids)
  assert _rel(logits, ref_logits) <= 1e-5
  flat_ref = dict(nnx.to_flat_state(ref_grads))
  for path, g in nnx.to_flat_state(grads):
    assert np.abs(np.asarray(flat_ref[path][...])).max() > 0, path  # every adapter gets a gradient
    assert _rel(g[...], flat_ref[path][...]) <= 1e-5, path


# ------------------------------------------------------------------------------------ PEFT in and out


@pytest.fixture(scope="module")
def hf_base(hf_model, save_hf, tmp_path_factory):
  """A random transformers Mixtral saved as a Hub directory, and our model loaded from it."""
  hf = hf_model(seed=0, num_hidden_layers=2, intermediate_size=96)
  path = save_hf(hf, tmp_path_factory.mktemp("hf") / "base")
  return hf, path, mixtral_jax.from_pretrained(path)


FWD = nnx.jit(lambda m, x: m(x))  # one compile for every plain model of this config


def _ids():
  return np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 11)).astype(np.int32)


@pytest.mark.slow
def test_peft_made_adapter_loads_into_ours(hf_logits, hf_model, hf_base, tmp_path):
  import peft
  import torch

  hf, path, _ = hf_base
  lc = peft.LoraConfig(r=4, lora_alpha=12, rank_pattern={"k_proj": 2}, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
                       target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
  pm = peft.get_peft_model(hf_model(seed=0, num_hidden_layers=2, intermediate_size=96), lc).eval()
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.05)
  pm.save_pretrained(str(tmp_path / "adapter"))
  ids = _ids()
  want, _ = hf_logits(pm, ids)
  ours = np.asarray(FWD(mixtral_jax.from_pretrained(path, adapter=tmp_path / "adapter"), ids))
  assert _rel(ours, want) <= 1e-4
  assert _rel(ours, hf_logits(hf, ids)[0]) > 1e-3  # the adapter matters


@pytest.mark.slow
def test_ours_to_peft_and_merged_export_match_transformers(hf_logits, hf_model, hf_base, tmp_path):
  import peft
  import transformers

  hf, path, base = hf_base
  model = with_random_adapters(base, LoraSection(rank=4, alpha=8.0, targets=TARGETS))
  ids = _ids()
  ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
  flat = {k: np.asarray(v) for k, v in orbax_io.flatten(lora_merge.adapter_values(model)).items()}
  factors = lora_merge.from_tree(flat, 2.0)
  write_peft(factors, base.cfg, str(tmp_path / "peft"), base_path=path)
  # ours -> PEFT -> transformers (peft's own forward on the HF base)
  pm = peft.PeftModel.from_pretrained(hf_model(seed=0, num_hidden_layers=2, intermediate_size=96),
                                      str(tmp_path / "peft")).eval()
  assert _rel(hf_logits(pm, ids)[0], ours) <= 1e-4
  # PEFT -> ours: the exported adapter loads back onto the base with the same logits
  back = mixtral_jax.from_pretrained(path, adapter=tmp_path / "peft")
  assert _rel(FWD(back, ids), ours) <= 1e-5
  # merged: transformers on the merged weights equals our unmerged forward (fp32)
  merged = lora_merge.merge_into(base, factors)
  mixtral_jax.checkpoint.export(mixtral_jax.checkpoint.save(merged, tmp_path / "merged_orbax"), tmp_path / "merged_hf")
  hf_merged = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "merged_hf")).eval()
  assert _rel(hf_logits(hf_merged, ids)[0], ours) <= 1e-5


@pytest.mark.slow
def test_unmappable_or_mismatched_adapters_are_refused(hf_base, tmp_path):
  from safetensors.numpy import save_file

  _, path, _ = hf_base
  bad = tmp_path / "bad"
  os.makedirs(bad)
  with open(bad / "adapter_config.json", "w") as f:
    json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["w1"]}, f)
  save_file({"base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight": np.zeros((2, 64), np.float32),
             "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_B.weight": np.zeros((96, 2), np.float32)},
            str(bad / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="cannot map adapter tensor.*experts.0.w1"):
    mixtral_jax.from_pretrained(path, adapter=bad)
  wrong = tmp_path / "wrong"  # an adapter for a base of another hidden size
  os.makedirs(wrong)
  with open(wrong / "adapter_config.json", "w") as f:
    json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, f)
  save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 128), np.float32),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((128, 2), np.float32)},
            str(wrong / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="another base model"):
    mixtral_jax.from_pretrained(path, adapter=wrong)


# ------------------------------------------------------------------------------------ plan and MFU


def test_plan_analytic_and_mfu_flops_are_lora_aware():
  """plan's analytic column for a LoRA step: the frozen bf16 base and fp32 adapters with AdamW moments,
  equal to the step's own abstract state shards (no compile); and the MFU FLOP count takes 4 per frozen
  parameter and 6 per adapter parameter a token uses, counted here from the model's adapter shapes."""
  from mixtral_jax.train import metrics, plan, step
  from mixtral_jax.train.config import TrainConfig
  cfg = CFG.replace(dtype="bfloat16")
  mesh = make_mesh("expert=4", num_experts=cfg.num_local_experts, devices=jax.devices()[:4])
  lora = LoraSection(rank=4)
  train_cfg = TrainConfig().override({"data.batch_size": 4, "data.seq_len": 32, "lora.rank": 4})
  _, abs_state, _ = step.build_train_step(cfg, train_cfg, mesh)
  a = plan.analytic(cfg, mesh, 4, 32, 1, lora)
  assert a["base_bytes"] == plan.shard_bytes(abs_state.base)
  assert a["param_bytes"] == plan.shard_bytes(abs_state.base) + plan.shard_bytes(abs_state.params)
  assert abs(a["opt_bytes"] - plan.shard_bytes(abs_state.opt_state)) < 64  # + AdamW's step counter
  assert {np.dtype(x.dtype) for x in jax.tree.leaves(abs_state.base)} == {np.dtype("bfloat16")}
  full = plan.analytic(cfg, mesh, 4, 32, 1)
  assert a["flops"] < full["flops"]

  E, k = cfg.num_local_experts, cfg.num_experts_per_tok
  adapters = nnx.state(nnx.eval_shape(lambda: Mixtral(CFG, rngs=nnx.Rngs(0), lora_cfg=lora)), LoRAParam)
  active = sum(np.prod(v.shape) * (k / E if "/w" in "/" + "/".join(map(str, p)) else 1)
               for p, v in nnx.to_flat_state(adapters))
  _, n_active = mixtral_jax.param_counts(CFG)
  frozen = n_active - CFG.vocab_size * CFG.hidden_size
  diff = metrics.train_flops_per_token(CFG, 64) - metrics.train_flops_per_token(CFG, 64, lora)
  assert diff == pytest.approx(2 * frozen - 6 * active, rel=1e-12)


@pytest.mark.slow
def test_dropout_only_with_a_key_and_rate_zero_changes_nothing(single_device_lora):
  """The step's loss with adapter dropout: a key changes it (and another key differently); with
  lora.dropout = 0 a key changes nothing, bit for bit (the no-dropout program)."""
  from mixtral_jax.train.config import TrainConfig
  from mixtral_jax.train.step import microbatch_loss
  adapters, base_state = single_device_lora[:2]  # random values on every target, dense experts

  def model(dropout):
    cfg, lora = CFG.replace(capacity_factor=4.0, moe_impl="dense"), ALL.__class__(**{**vars(ALL), "dropout": dropout})
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Mixtral(cfg, rngs=nnx.Rngs(0), lora_cfg=lora)))
    fresh = lambda s: jax.tree.map(lambda x: x, s)  # noqa: E731
    return nnx.merge(graphdef, fresh(adapters), fresh(base_state))

  ids = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
  mb = {"inputs": ids, "targets": np.roll(ids, -1, 1), "weights": np.ones(ids.shape, np.float32),
        "segment_ids": np.ones(ids.shape, np.int32), "positions": np.tile(np.arange(9, dtype=np.int32), (2, 1))}
  tc = TrainConfig()
  loss = nnx.jit(lambda m, key: microbatch_loss(m, mb, tc, 18.0, 1, key)[0])
  k1, k2 = jax.random.key_data(jax.random.key(1)), jax.random.key_data(jax.random.key(2))
  dropping = model(0.5)
  a, b = (float(loss(dropping, k)) for k in (k1, k2))
  still = model(0.0)
  plain = float(nnx.jit(lambda m: microbatch_loss(m, mb, tc, 18.0, 1)[0])(still))
  assert float(loss(still, k1)) == plain
  assert len({plain, a, b}) == 3
