"""The training loop end to end on a cut-down tiny-pretrain: the loss falls, outputs land in the workdir,
a SIGTERM-stopped run resumes to exactly the losses of a straight run, a NaN stops the run naming the
step, and unreadable checkpoints are never silently replaced by a fresh start."""

import contextlib
import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mixtral_jax.train import loop
from mixtral_jax.train.checkpointing import CheckpointError
from mixtral_jax.train.config import load_config

pytestmark = pytest.mark.slow

N = 6  # steps before the interruption; the straight run takes 2N

SMALL = [
    "model.overrides={hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2}",
    "data.max_files=12", "data.seq_len=32", "data.batch_size=8", "data.heldout_fraction=0.25",
    f"train.steps={2 * N}", f"train.checkpoint_every={N}", f"train.eval_every={N}", "train.eval_batches=2",
    "train.peak_flops=1e11", "train.progress=false", "optimizer.warmup_steps=2", "optimizer.lr=1e-2",
    "loss.ce_chunk=16",
]


def small_config(*extra):
  return load_config("tiny-pretrain", SMALL + list(extra))


CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def compilation_cache(directory):
  """A persistent compilation cache in ``directory``, so runs that compile identical programs (in this
  process or in a child with the same JAX_* variables) compile each once."""
  from jax._src import compilation_cache as cc  # noqa: PLC0415 (no public reset; JAX's own tests use it)

  old = {n: getattr(jax.config, n) for n in CACHE_FLAGS}
  for n, v in zip(CACHE_FLAGS, (str(directory), 0, 0)):
    jax.config.update(n, v)
  cc.reset_cache()
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    # JAX decides once per process whether the cache is used and keeps the directory it opened: without a
    # reset, every later test's compile (over 1 s) would still be serialized into this directory, and
    # serializing some executables aborts the process (seen in test_model after this module).
    cc.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
  with compilation_cache(tmp_path_factory.mktemp("jax_cache")):
    yield


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, loop.run(small_config(), workdir)


def test_tiny_pretrain_lowers_loss_and_writes_the_workdir(straight):
  workdir, result = straight
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert len(losses) == 2 * N
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
  assert result.eval_losses[2 * N] < result.eval_losses[N]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == list(range(1, 2 * N + 1))
  assert [r["data_tokens/data"] for r in records] == [s * 8 * 32 for s in range(1, 2 * N + 1)]
  for key in ("loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "mfu", "dropped", "data_tokens/data"):
    assert key in records[-1], key
  assert np.asarray(records[-1]["expert_load"]).shape == (2, 8)
  np.testing.assert_allclose(np.sum(records[-1]["expert_load"], axis=1), 1.0, atol=1e-4)
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  for f in ("config.json", "tokenizer.model", "train_config.yaml"):
    assert os.path.isfile(os.path.join(workdir, f)), f
  # The checkpoint's params item is the model's pure-dict parameter tree (the model-checkpoint contract).
  meta = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", str(2 * N), "params"))
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  assert set(tree) == {"blocks", "embed_VD", "final_norm", "head_DV"}
  assert tuple(tree["blocks"]["moe"]["w1_EDF"].shape) == (2, 8, 32, 64)


def test_sigterm_saves_and_resume_is_exact(straight, tmp_path, monkeypatch):
  _, full = straight
  workdir = str(tmp_path)
  log = loop.MetricsLogger.log

  def log_then_preempt(self, step, metrics):
    log(self, step, metrics)
    if step == N:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsLogger, "log", log_then_preempt)
  first = loop.run(small_config(), workdir)
  assert first.stopped_by_signal and first.final_step == N
  monkeypatch.setattr(loop.MetricsLogger, "log", log)
  second = loop.run(small_config(), workdir)
  assert second.start_step == N and second.final_step == 2 * N
  for s in range(N + 1, 2 * N + 1):
    assert second.losses[s] == full.losses[s], (s, second.losses[s], full.losses[s])
  assert second.eval_losses[2 * N] == full.eval_losses[2 * N]


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
  take = loop.data_lib.BatchIterator.__next__

  def poisoned(self):  # the 5th batch carries NaN loss weights, so step 5's loss is NaN
    batch = take(self)
    if self.batch == 5:
      batch["weights"] = np.full_like(batch["weights"], np.nan)
    return batch

  monkeypatch.setattr(loop.data_lib.BatchIterator, "__next__", poisoned)
  with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 5; the last good checkpoint is step 4"):
    loop.run(small_config("train.checkpoint_every=1", "train.eval_every=0"), str(tmp_path))
  assert sorted(map(int, os.listdir(tmp_path / "checkpoints"))) == [2, 3, 4]  # keep=3: the newest good ones


def test_unreadable_checkpoints_stop_the_run(tmp_path):
  bad = tmp_path / "checkpoints" / "7"
  bad.mkdir(parents=True)
  (bad / "garbage").write_text("not a checkpoint")
  with pytest.raises(CheckpointError, match=r"holds checkpoints \['7'\] but none can be restored"):
    loop.run(small_config(), str(tmp_path))
  assert loop.run(small_config(), str(tmp_path), restart=True).final_step == 2 * N
  assert os.path.isdir(tmp_path / "checkpoints.before-restart-1" / "7")
