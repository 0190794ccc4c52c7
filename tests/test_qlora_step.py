"""The QLoRA step: LoRA on a frozen nf4 / int8 base (``lora.base_quantize``), against the quantized model's
own forward; the base never changes and has no gradient; the plan compiles it and counts its bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.inference.quantize import quantize
from mixtral_jax.model import Mixtral
from mixtral_jax.sharding.mesh import make_mesh
from mixtral_jax.train import step as step_lib
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.plan import training as plan_training

pytestmark = pytest.mark.slow  # transformers references / several compiles

# nf4 packs o_NHD along H, which must be a multiple of its 64-entry blocks
CFG = mixtral_jax.get_config("tiny", vocab_size=512, head_dim=64, dtype="float32", remat="full")
B, T = 8, 32


def _train_cfg(base_quantize, **more):
  return TrainConfig().override({"model.preset": "tiny", "data.batch_size": B, "data.seq_len": T,
                                 "loss.ce_chunk": T, "lora.rank": 4, "lora.base_quantize": base_quantize,
                                 "optimizer.warmup_steps": 1, "optimizer.lr": 1e-2, **more})


def _batch(mesh):
  ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, B, T + 1)).astype(np.int32)
  batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": np.ones((1, B, T), np.float32),
           "segment_ids": np.ones((1, B, T), np.int32),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy()}
  return jax.device_put(batch, step_lib.batch_sharding(mesh)), ids[0]


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_step_zero_loss_is_the_quantized_models_and_the_base_stays(mode):
  tc = _train_cfg(mode)
  mesh = make_mesh(None, num_experts=CFG.num_local_experts)
  fn, _, _ = step_lib.build_train_step(CFG, tc, mesh)
  state = step_lib.init_state(CFG, tc, mesh)
  leaves = jax.tree.leaves(state.base)
  assert (jnp.dtype("uint8") if mode == "nf4" else jnp.dtype("int8")) in {a.dtype for a in leaves}
  base0 = [np.asarray(a) for a in leaves]
  adapters0 = [np.asarray(a) for a in jax.tree.leaves(state.params)]
  batch, ids = _batch(mesh)
  # The reference: the same random model (seed train.seed), quantized by the inference path, its float64 CE.
  ref = quantize(Mixtral(step_lib.base_config(CFG, tc.lora), rngs=nnx.Rngs(tc.train.seed)), mode)
  logits = np.asarray(ref(jnp.asarray(ids[:, :-1])), np.float64)
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  ce = np.mean(lse - np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0])
  state, metrics = fn(state, batch)
  assert abs(float(metrics["ce_loss"]) - ce) < 1e-4
  for _ in range(2):  # the first step has learning rate 0 (warmup)
    state, metrics = fn(state, batch)
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(base0, jax.tree.leaves(state.base)))
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(adapters0, jax.tree.leaves(state.params)))
  assert float(metrics["ce_loss"]) < ce


def test_base_quantize_needs_lora_and_a_known_form():
  with pytest.raises(ValueError, match="lora.base_quantize=nf4 needs LoRA"):
    TrainConfig().override({"model.preset": "tiny", "lora.base_quantize": "nf4"})
  with pytest.raises(ValueError, match="lora.base_quantize='nf8'; choose from None, int8, nf4"):
    _train_cfg("nf8")


def test_plan_compiles_the_qlora_step_and_counts_the_nf4_base():
  mesh = make_mesh(None, num_experts=CFG.num_local_experts)
  plain = plan_training.plan(CFG, mesh, batch=B, seq=T, lora_rank=4)
  nf4 = plan_training.plan(CFG, mesh, batch=B, seq=T, lora_rank=4, base_quantize="nf4")
  # attention and experts at 0.5625 bytes a weight instead of 4 (float32 compute here): far smaller
  assert nf4["compiled"]["base_bytes"] < 0.4 * plain["compiled"]["base_bytes"]
