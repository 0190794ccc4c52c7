"""The train loop's recovery paths end to end through ``mixtral-jax train`` (issue 23, items 3 and 7), on
test_train_loop's cut-down tiny-pretrain: a resume with other data settings is refused in one line
before the saved train_config.yaml is touched; a truncated newest step is moved aside and the rerun
trains on from the previous one, saving over the step (no StepAlreadyExistsError, no ``Event loop is
closed`` noise) with metrics.jsonl listing each step once; SIGTERM's save-and-exit returns 75
(``PREEMPTED_EXIT_CODE``). References: the run's own checkpoints and records, and a straight run's
losses (the resumed steps must reproduce them exactly)."""

import json
import os
import signal

import pytest

from mixtral_jax.cli import main as cli
from mixtral_jax.train import loop
from mixtral_jax.train.checkpointing import PREEMPTED_EXIT_CODE
from test_train_loop import SMALL, compilation_cache

pytestmark = pytest.mark.slow

SETTINGS = [s for s in SMALL if not s.startswith(("train.steps", "train.checkpoint_every", "train.eval_every"))]


def _train(workdir, steps, *extra):
  sets = [a for kv in SETTINGS + ["train.checkpoint_every=2", "train.eval_every=0", *extra] for a in ("--set", kv)]
  return cli(["train", "--config", "tiny-pretrain", "--workdir", str(workdir), "--steps", str(steps), *sets])


def _steps_logged(workdir):
  return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  with compilation_cache(tmp_path_factory.mktemp("jax_cache")):
    yield


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """A run of 6 steps without interruption (checkpoints 2, 4, 6): its losses are the reference."""
  workdir = tmp_path_factory.mktemp("straight")
  assert _train(workdir, 6) == 0
  return workdir, {json.loads(line)["step"]: json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")}


def test_resume_with_other_data_settings_is_refused_before_anything_changes(straight, tmp_path, capsys):
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints" / "6")  # another process's run, as far as the checks go
  for f in ("train_config.yaml", "config.json"):
    (workdir / f).write_bytes((straight[0] / f).read_bytes())
  saved = (workdir / "train_config.yaml").read_text()
  capsys.readouterr()
  assert _train(workdir, 8, "data.batch_size=16") == 2
  err = capsys.readouterr().err
  assert "data.batch_size was 8, now 16" in err and err.count("\n") == 1, err
  assert (workdir / "train_config.yaml").read_text() == saved and os.listdir(workdir / "checkpoints") == ["6"]


def test_truncated_newest_step_is_moved_aside_and_the_run_goes_on(straight, tmp_path, capfd, caplog):
  workdir = tmp_path / "run"
  assert _train(workdir, 4) == 0
  for root, _, files in os.walk(workdir / "checkpoints" / "4"):
    for f in files:
      open(os.path.join(root, f), "r+b").truncate(10)
  capfd.readouterr()
  assert _train(workdir, 6) == 0
  err = capfd.readouterr().err + caplog.text  # the log goes to pytest's handler
  assert "Event loop is closed" not in err and "StepAlreadyExists" not in err and "Traceback" not in err, err
  assert "resumed from step 2" in err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6", "corrupt-4"]
  assert _steps_logged(workdir) == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone, listed once
  records = {json.loads(line)["step"]: json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")}
  assert records == straight[1]  # the resumed run reproduces the straight run's losses exactly


def test_sigterm_exits_with_the_preempted_code_and_resumes(straight, tmp_path, monkeypatch, capsys):
  log = loop.MetricsLogger.log

  def log_then_preempt(self, step, metrics):
    log(self, step, metrics)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsLogger, "log", log_then_preempt)
  assert _train(tmp_path, 6) == PREEMPTED_EXIT_CODE == 75  # was 0, which a scheduler reads as "finished"
  assert "SIGTERM: saved step 3" in capsys.readouterr().out
  monkeypatch.setattr(loop.MetricsLogger, "log", log)
  assert _train(tmp_path, 6) == 0
  assert _steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_disk_full_during_a_training_save_is_one_line(monkeypatch, tmp_path, capsys):
  """The loop's CheckpointError raised from the storage's ENOSPC (as ``Checkpointer._surfacing`` makes it),
  with a second error raised while the loop's ``finally`` closes things: one line, not the chain."""
  import errno

  from mixtral_jax.train import commands
  from mixtral_jax.train.checkpointing import CheckpointError

  def full(args):
    try:
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "4"))
    except OSError as e:
      raise CheckpointError("the checkpoint save of step 4 in ... failed; the checkpoints of steps [2] are "
                            "kept. Fix the cause, then rerun the same command to resume") from e

  def closing_fails(args):
    try:
      full(args)
    finally:
      raise RuntimeError("close failed")  # noqa: B012 - as an exception raised while closing the manager

  for main in (full, closing_fails):
    monkeypatch.setattr(commands, "train_main", main)
    assert cli(["train", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on device" in err and str(tmp_path / "checkpoints") in err, err
  monkeypatch.setattr(commands, "train_main", lambda args: (_ for _ in ()).throw(RuntimeError("not a disk")))
  with pytest.raises(RuntimeError, match="not a disk"):  # anything else still raises
    cli(["train", "--workdir", str(tmp_path)])


def test_a_climbing_loss_warns_through_the_loop(straight, tmp_path, monkeypatch, capsys):
  """The train step's reported loss scaled up from step 3 on (x3, x5, x8, x12: finite, so no NaN stop):
  the run warns once that the loss may be diverging (``MetricsLogger``'s ``DivergenceWatch``, fed by the
  loop every step) and still finishes."""
  build = loop.step_lib.build_train_step
  scale = {1: 1.0, 2: 1.0, 3: 3.0, 4: 5.0, 5: 8.0, 6: 12.0}

  def climbing(*args, **kwargs):
    step_fn, *rest = build(*args, **kwargs)

    def scaled(state, batch):
      state, metrics = step_fn(state, batch)
      return state, {**metrics, "loss": metrics["loss"] * scale[int(state.step)]}
    return (scaled, *rest)

  monkeypatch.setattr(loop.step_lib, "build_train_step", climbing)
  assert _train(tmp_path, 6) == 0
  out = capsys.readouterr().out
  assert out.count("the loss may be diverging") == 1 and "at step 5" in out, out
