"""Recovery that recovers (issue 23, item 3): an unreadable newest training checkpoint is moved aside and the
previous one resumes (and the step can be saved again); training checkpoints get digests that catch a
changed weight; convert removes the temporaries of killed runs and refuses a destination inside its
source; metrics.jsonl is cut back to the resumed step. References: the arrays saved (NumPy equality)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

import mixtral_jax
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint import integrity, staging
from mixtral_jax.cli import main as cli
from mixtral_jax.train.checkpointing import CheckpointError, Checkpointer
from mixtral_jax.train.metrics import DivergenceWatch, MetricsLogger, read_metrics, truncate_metrics
from mixtral_jax.train.step import TrainState


def _state(step: int) -> TrainState:
  params = {"blocks": {"w": jnp.full((2, 3, 4), float(step))}, "embed": jnp.arange(6.0) + step}
  return TrainState(params, {"mu": jnp.zeros(3)}, jnp.int32(step), jnp.zeros(2, jnp.uint32))


def _abstract():
  s = _state(0)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), s)


def _saved(tmp_path, steps):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5, async_save=False)
  for step in steps:
    ckpt.save(_state(step), {"pos": step}, force=True)
  ckpt.wait()
  return ckpt


def test_training_steps_are_sealed_and_a_changed_weight_is_caught(tmp_path):
  ckpt = _saved(tmp_path, [1, 2])
  params = tmp_path / "checkpoints" / "2" / "params"
  assert integrity.verify(str(params)) is True
  ckpt.close()
  w = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{params}/", "path": "blocks.w"}},
              open=True).result()
  w[1, 2, 3].write(np.float32(7.5)).result()  # decodes fine: only the digest can tell
  with pytest.raises(integrity.ChecksumError, match=r"array blocks\.w \(layer 1\) fails its checksum"):
    integrity.verify(str(params))
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5, async_save=False)
  state, data = ckpt.restore_latest(_abstract())
  assert int(state.step) == 1 and data == {"pos": 1}
  assert os.path.isdir(tmp_path / "checkpoints" / "corrupt-2")


def test_truncated_newest_step_is_moved_aside_and_saved_again(tmp_path):
  _saved(tmp_path, [25, 30]).close()
  for root, _, files in os.walk(tmp_path / "checkpoints" / "30"):  # truncate every file of step 30
    for f in files:
      open(os.path.join(root, f), "r+b").truncate(10)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5, async_save=False)
  state, _ = ckpt.restore_latest(_abstract())
  assert int(state.step) == 25
  np.testing.assert_array_equal(state.params["embed"], np.arange(6.0) + 25)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["25", "corrupt-30"]
  ckpt.save(_state(30), {"pos": 30}, force=True)  # no StepAlreadyExistsError
  ckpt.wait()
  state, _ = ckpt.restore_latest(_abstract())
  assert int(state.step) == 30


def test_no_readable_step_stops_instead_of_starting_over(tmp_path):
  _saved(tmp_path, [5]).close()
  os.remove(tmp_path / "checkpoints" / "5" / "params" / "_METADATA")
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5, async_save=False)
  with pytest.raises(CheckpointError, match=r"holds checkpoints \['5'\] but none can be restored"):
    ckpt.restore_latest(_abstract())
  assert os.listdir(tmp_path / "checkpoints") == ["5"]  # nothing moved while no good step exists
  with pytest.raises(CheckpointError, match="none can be restored"):  # and the same on the next run
    Checkpointer(str(tmp_path / "checkpoints"), keep=5, async_save=False).restore_latest(_abstract())


# ------------------------------------------------------------------------------------ convert

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("src")
  cfg = mixtral_jax.get_config("tiny", num_hidden_layers=1, vocab_size=300, hidden_size=32, intermediate_size=64,
                               num_attention_heads=4, num_key_value_heads=2)
  checkpoint.save(mixtral_jax.create_model(cfg, seed=1), root / "orbax")
  checkpoint.export(root / "orbax", root / "hf")
  return root / "hf"


@pytest.mark.slow
def test_destination_equal_to_or_inside_the_source_is_refused(hf_dir, capsys):
  before = sorted(os.listdir(hf_dir))
  for dst in (hf_dir, hf_dir / "sub" / "out"):
    assert cli(["convert", str(hf_dir), str(dst), "--overwrite"]) == 2
    assert "is the source" in capsys.readouterr().err
  assert sorted(os.listdir(hf_dir)) == before


KILLED = """
import os, signal, sys
from mixtral_jax.checkpoint import orbax_io
write = orbax_io.StreamingWriter.write
def write_then_die(self, *a, **k):
  write(self, *a, **k)
  os.kill(os.getpid(), signal.SIGKILL)
orbax_io.StreamingWriter.write = write_then_die
from mixtral_jax.cli import main
main(["convert", sys.argv[1], sys.argv[2]])
"""


def test_killed_convert_leaves_a_temporary_that_the_next_run_removes(hf_dir, tmp_path):
  dst = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  child = subprocess.run([sys.executable, "-c", KILLED, str(hf_dir), str(dst)], env=env, capture_output=True,
                         timeout=300)
  assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
  leaked = [e for e in os.listdir(tmp_path) if e.startswith(".out.tmp-")]
  assert len(leaked) == 1 and not dst.exists()
  live = tmp_path / ".out.tmp-live"  # a run in progress: holds its lock, so it is left alone
  live.mkdir()
  with staging.owned(str(live)):
    assert cli(["convert", str(hf_dir), str(dst)]) == 0
    assert live.exists()
  assert sorted(os.listdir(tmp_path)) == [".out.tmp-live", "out"]
  assert not os.path.exists(dst / staging.OWNER)


# ------------------------------------------------------------------------------------ metrics

def test_metrics_cut_back_to_the_resumed_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 9)) + '{"step": 9, "lo')
  assert truncate_metrics(str(path), 5) == 4
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
  logger = MetricsLogger(str(tmp_path), total_steps=8, start_step=3, progress=False, print_every=100)
  logger.log(4, {"loss": 1.0})
  logger.close()
  lines = [json.loads(x) for x in path.read_text().splitlines()]
  assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[-1]["loss"] == 1.0


def test_divergence_warning_when_the_loss_climbs_far_above_its_minimum():
  watch = DivergenceWatch()
  losses = [10, 8, 6, 5, 5.2, 4.9] + [12, 40, 260, 250]
  warnings = [watch.update(i, x) for i, x in enumerate(losses)]
  assert [i for i, w in enumerate(warnings) if w] == [8]
  assert "260.0000 at step 8 against a minimum of 4.9000" in warnings[8]
  noisy = DivergenceWatch()
  assert not any(noisy.update(i, x) for i, x in enumerate([3.0, 2.0, 2.6, 2.1, 2.9, 1.9, 2.4]))
