"""The training loop itself (``train.loop.run``: data pipeline, step, checkpoints, resume) over two
simulated slices, on CPU.

``train.simulated_slices=2`` splits the 8 CPU devices into two slices of 4, so ``train.mesh:
dcn_data=2,fsdp=2,expert=2`` is the mesh a two-slice pod gets (each ``data`` index one slice).
Reference: the same loop on one device (``make_mesh`` handed the first device only), float32, the same
config, seed and data. Only the reduction order differs, so the losses agree to a tight tolerance. The
two-slice run's checkpoint then resumes through the loop on ``fsdp=8`` (one slice, no simulated
slices), and the next steps' losses must be the one-device run's for the same steps: the restore, the
data iterator's position and the re-sharding all go through the loop's own code.
"""

import functools

import jax
import pytest

from mixtral_jax.sharding.mesh import make_mesh
from mixtral_jax.train import loop
from mixtral_jax.train.config import load_config
from test_train_loop import SMALL

pytestmark = pytest.mark.slow

SETTINGS = [s for s in SMALL if not s.startswith(("train.steps", "train.checkpoint_every", "train.eval_every"))]
# A schedule that does not depend on train.steps, which differs between the runs: by default the cosine
# runs until train.steps, and the warmup is cut to train.steps - 1.
SETTINGS += ["optimizer.warmup_steps=1", "optimizer.decay_steps=10", "train.eval_every=0", "train.checkpoint_every=100", "train.async_checkpoint=false"]
TWO_SLICES = ["train.mesh=dcn_data=2,fsdp=2,expert=2", "train.simulated_slices=2"]


def _run(workdir, steps: int, *extra):
  return loop.run(load_config("tiny-pretrain", SETTINGS + [f"train.steps={steps}", *extra]), str(workdir))


def _losses(result) -> list[float]:
  return [result.losses[s] for s in sorted(result.losses)]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """Four steps of the loop on one device: the reference losses."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, "make_mesh", functools.partial(make_mesh, devices=jax.devices()[:1]))
    result = _run(tmp_path_factory.mktemp("one_device"), 4)
  return _losses(result)


def test_loop_on_two_slices_then_resumed_on_fsdp8_matches_one_device(one_device, tmp_path, capsys):
  two = _run(tmp_path, 2, *TWO_SLICES)  # saves step 2 at the end
  assert "mesh data=2,fsdp=2,expert=2,tensor=1 (2 simulated slices)" in capsys.readouterr().out
  assert (two.start_step, two.final_step) == (0, 2)
  assert _losses(two) == pytest.approx(one_device[:2], rel=2e-6)
  resumed = _run(tmp_path, 4, "train.mesh=fsdp=8")  # the same workdir, one slice of 8, no simulated slices
  assert (resumed.start_step, resumed.final_step) == (2, 4)
  # The restored state is the two-slice run's, which differs from the one-device run's at step 2 by
  # reduction-order noise only; one more Adam step keeps it at that order.
  assert _losses(resumed) == pytest.approx(one_device[2:], rel=1e-5)
  assert one_device[3] < one_device[0]  # it trains


def test_simulated_slices_are_refused_where_they_mean_nothing(tmp_path):
  with pytest.raises(ValueError, match=r"train.simulated_slices=0 is below 1"):
    load_config("tiny-pretrain", ["train.simulated_slices=0"])
  with pytest.raises(ValueError, match=r"simulated_slices=3 does not split the 8 devices"):
    _run(tmp_path, 1, "train.mesh=dcn_data=3,expert=2", "train.simulated_slices=3")

  class TpuDevice:  # what real multi-slice devices carry: their own slice index
    slice_index = 0

  with pytest.raises(ValueError, match=r"given for devices that have a slice_index; drop simulated_slices"):
    make_mesh("data=2", devices=[TpuDevice(), TpuDevice()], simulated_slices=2)
