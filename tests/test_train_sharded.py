"""The real train step on a data=2,expert=4 mesh of 8 simulated devices gives the losses of one device
(dropless, fp32), step after step, with gradient accumulation."""

import jax
import numpy as np
import pytest

from mixtral_jax.config import MixtralConfig
from mixtral_jax.sharding.mesh import make_mesh
from mixtral_jax.train import step as step_lib
from mixtral_jax.train.config import TrainConfig

pytestmark = pytest.mark.slow

CFG = MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TRAIN = TrainConfig().override({"data.batch_size": 16, "data.seq_len": 16, "optimizer.grad_accum": 2,
                                "optimizer.warmup_steps": 1, "optimizer.lr": 1e-2, "loss.ce_chunk": 8,
                                "loss.z_loss_coef": 1e-3, "train.steps": 4})


def batches(n, seed=0):
  """Packed rows with two documents each and a padded tail, as the data pipeline makes them."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    shape = (2, 8, 16)
    ids = rng.integers(0, CFG.vocab_size, (*shape[:2], 17)).astype(np.int32)
    seg = np.ones(shape, np.int32)
    seg[..., 9:] = 2
    seg[..., 14:] = 0  # padding
    pos = np.where(seg == 2, np.arange(16) - 9, np.arange(16)).astype(np.int32)
    w = ((seg > 0) & (np.roll(seg, -1, -1) == seg)).astype(np.float32)
    out.append({"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": w, "segment_ids": seg,
                "positions": np.where(seg > 0, pos, 0).astype(np.int32)})
  return out


def train_losses(mesh, data):
  step_fn, abstract_state, abstract_batch = step_lib.build_train_step(CFG, TRAIN, mesh)
  state = step_lib.init_state(CFG, TRAIN, mesh)
  sh = step_lib.batch_sharding(mesh)
  losses = []
  for b in data:
    state, m = step_fn(state, {k: jax.device_put(v, sh) for k, v in b.items()})
    losses.append([float(m["loss"]), float(m["aux_loss"]), float(m["grad_norm"])])
  return np.array(losses), abstract_state


def test_data2_expert4_matches_one_device():
  data = batches(3)
  one, _ = train_losses(make_mesh(None, devices=jax.devices()[:1]), data)
  mesh = make_mesh("data=2,expert=4", num_experts=CFG.num_local_experts)
  eight, abstract_state = train_losses(mesh, data)
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  assert one[-1, 0] < one[0, 0]  # it trains
  # The experts really are split over the expert axis, in the params and the Adam moments alike.
  assert abstract_state.params["blocks"]["moe"]["w1_EDF"].sharding.spec[1] == "expert"
  mu = abstract_state.opt_state[1][0].mu["blocks"]["moe"]["w1_EDF"]
  assert mu.sharding.spec[1] == "expert"
