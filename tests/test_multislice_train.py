"""Training and checkpoints over a two-slice mesh, on simulated CPU devices (no TPU compiler needed).

The 8 CPU devices are split into two simulated slices of 4 (``make_mesh(..., simulated_slices=2)``),
so ``dcn_data=2,fsdp=2,expert=2`` is the very mesh a two-slice pod gets: each ``data`` index one slice.
References:
  - a single-device run of the same steps (float32; only the reduction order differs, so a tolerance);
  - for a checkpoint saved on the two slices and restored onto other meshes (8 devices on one slice,
    and 4 devices): the saved arrays themselves (restore is exact, bit for bit), and the same state
    placed on the target mesh directly with ``jax.device_put`` (continuing from the restored state is
    then bit-identical: both runs are the same program on the same inputs). Bit-identity with a run
    that *started* on the target mesh is not defined: its earlier steps reduce in another order.
"""

import functools

import jax
import numpy as np
import pytest

from mixtral_jax.config import MixtralConfig
from mixtral_jax.sharding.mesh import device_slices, make_mesh
from mixtral_jax.train import step as step_lib
from mixtral_jax.train.checkpointing import Checkpointer
from mixtral_jax.train.config import TrainConfig

CFG = MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TRAIN = TrainConfig().override({"data.batch_size": 8, "data.seq_len": 16, "optimizer.warmup_steps": 1,
                                "optimizer.lr": 1e-2, "loss.ce_chunk": 8, "loss.z_loss_coef": 1e-3})
MESHES = {  # name -> (spec, devices, simulated slices)
    "two_slices": ("dcn_data=2,fsdp=2,expert=2", 8, 2),
    "one_slice_x8": ("dcn_data=1,fsdp=4,expert=2", 8, None),  # one slice of 8
    "four_devices": ("fsdp=2,expert=2", 4, None),
    "one_device": (None, 1, None),
}


@functools.lru_cache(maxsize=None)
def mesh_of(name: str):
  spec, n, slices = MESHES[name]
  return make_mesh(spec, devices=jax.devices()[:n], num_experts=CFG.num_local_experts, simulated_slices=slices)


@functools.lru_cache(maxsize=None)
def step_of(name: str):
  """(jitted step, abstract state) on that mesh: compiled once per module."""
  step_fn, abstract_state, _ = step_lib.build_train_step(CFG, TRAIN, mesh_of(name))
  return step_fn, abstract_state


def batches(n: int, seed: int = 0) -> list[dict]:
  """Packed rows of two documents each with a padded tail, ``[1, 8, 16]`` fields."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(0, CFG.vocab_size, (1, 8, 17)).astype(np.int32)
    seg = np.ones((1, 8, 16), np.int32)
    seg[..., 9:], seg[..., 14:] = 2, 0
    pos = np.where(seg == 2, np.arange(16) - 9, np.arange(16))
    w = ((seg > 0) & (np.roll(seg, -1, -1) == seg)).astype(np.float32)
    out.append({"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": w, "segment_ids": seg,
                "positions": np.where(seg > 0, pos, 0).astype(np.int32)})
  return out


def place(host_state, name: str):
  """A host (NumPy) state on that mesh's shardings."""
  return jax.device_put(host_state, jax.tree.map(lambda s: s.sharding, step_of(name)[1]))


def run(name: str, state, data: list[dict]):
  """(state, losses) after the steps of ``data`` on that mesh."""
  step_fn, _ = step_of(name)
  sh = step_lib.batch_sharding(mesh_of(name))
  losses = []
  for b in data:
    state, m = step_fn(state, {k: jax.device_put(v, sh) for k, v in b.items()})
    losses.append(float(m["loss"]))
  return state, np.array(losses)


def leaves(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_two_simulated_slices_are_the_dcn_data_axis():
  mesh = mesh_of("two_slices")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
  halves = list(device_slices(jax.devices(), 2).values())
  assert [set(mesh.devices[i].flat) for i in range(2)] == [set(h) for h in halves]  # data index = slice
  with pytest.raises(ValueError, match="simulated_slices=3 does not split the 8 devices"):
    make_mesh("dcn_data=3,expert=2", simulated_slices=3)
  with pytest.raises(ValueError, match="multiply to 4 but there are 2 slices"):
    make_mesh("dcn_data=4,expert=2", simulated_slices=2)


@pytest.mark.slow
def test_two_slice_training_matches_one_device():
  data = batches(1) * 3  # one batch thrice: the loss must fall
  init = jax.device_get(step_lib.init_state(CFG, TRAIN, mesh_of("one_device")))
  two, two_losses = run("two_slices", place(init, "two_slices"), data)
  one, one_losses = run("one_device", place(init, "one_device"), data)
  np.testing.assert_allclose(two_losses, one_losses, rtol=2e-6)
  assert one_losses[-1] < one_losses[0]  # it trains
  # Adam divides by sqrt(v): where a gradient is near zero, reduction-order noise moves the update;
  # 5e-5 is 0.5% of one step's size (lr 1e-2). Measured: 1 of 32768 expert weights off by 1.6e-5.
  for a, b in zip(leaves(two), leaves(one), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["one_slice_x8", "four_devices"])
def test_checkpoint_of_two_slices_restores_on_another_mesh(target, tmp_path):
  data = batches(4, seed=1)
  init = jax.device_get(step_lib.init_state(CFG, TRAIN, mesh_of("one_device")))
  saved, _ = run("two_slices", place(init, "two_slices"), data[:2])
  saved_host = jax.device_get(saved)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
  ckpt.save(saved, {"epoch": 0})
  ckpt.wait()
  restored, data_state = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False).restore_latest(
      step_of(target)[1])
  assert data_state == {"epoch": 0}
  assert int(restored.step) == 2
  for a, b in zip(leaves(restored), leaves(saved_host), strict=True):  # exact, every array of the state
    assert a.dtype == b.dtype and np.array_equal(a, b)
  mesh_devices = set(mesh_of(target).devices.flat)
  assert all(set(x.sharding.device_set) == mesh_devices for x in jax.tree.leaves(restored))
  # Continuing: bit-identical to the same state placed on the target mesh without a checkpoint.
  after_restore, losses = run(target, restored, data[2:])
  direct, direct_losses = run(target, place(saved_host, target), data[2:])
  assert np.array_equal(losses, direct_losses)
  assert all(np.array_equal(a, b) for a, b in zip(leaves(after_restore), leaves(direct)))
  # ... and the next step's loss is one device's from the same state, up to the reduction order.
  _, one_losses = run("one_device", place(saved_host, "one_device"), data[2:3])
  np.testing.assert_allclose(losses[0], one_losses[0], rtol=2e-6)
