"""One line, not a traceback (issue 23, item 4), and tokenize rebuilding what its manifest lists (item 3):
zero or negative run settings refused at config time; a resume with other data settings refused before
the saved train_config.yaml is touched; disk errors as one line; the shard advice that works. References:
the token stream of the first tokenization (byte equality) and the files left unchanged."""

import errno
import os

import pytest

from mixtral_jax import cli as cli_lib
from mixtral_jax.cli import main as cli
from mixtral_jax.tokenizer import Tokenizer
from mixtral_jax.train import data as data_lib
from mixtral_jax.train.checkpointing import PREEMPTED_EXIT_CODE
from mixtral_jax.train.config import TrainConfig, check_resume, load_config


@pytest.mark.parametrize("flag, value, key", [
    ("--batch-size", "0", "data.batch_size=0"), ("--seq-len", "0", "data.seq_len=0"),
    ("--set", "train.checkpoint_every=0", "train.checkpoint_every=0"),
    ("--set", "optimizer.lr=-0.001", "optimizer.lr=-0.001 is negative"),
    ("--set", "loss.ce_chunk=0", "loss.ce_chunk=0"),
])
def test_bad_settings_are_one_line_before_anything_runs(flag, value, key, tmp_path, capsys):
  rc = cli(["train", "--config", "tiny-pretrain", "--workdir", str(tmp_path / "run"), flag, value])
  err = capsys.readouterr().err
  assert rc == 2 and key in err and err.count("\n") == 1, err
  assert not os.path.exists(tmp_path / "run")


def test_packaged_configs_still_validate():
  from mixtral_jax.train.config import packaged_configs
  for name in packaged_configs():
    load_config(name, ["model.checkpoint=/nowhere"])


def test_resume_with_other_data_settings_is_refused_and_keeps_the_saved_config(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "10").mkdir(parents=True)
  first = load_config("tiny-pretrain", ["data.paths=[corpus_a]"])
  first.save(workdir / "train_config.yaml")
  saved = (workdir / "train_config.yaml").read_text()
  check_resume(str(workdir), first)  # same settings: fine
  check_resume(str(workdir), first.override(["optimizer.lr=1e-4", "train.steps=900"]))  # not data: fine
  for change, named in (("data.paths=[corpus_b]", "data.paths"), ("data.batch_size=16", "data.batch_size"),
                        ("data.seq_len=128", "data.seq_len")):
    with pytest.raises(ValueError, match=rf"{named} was .* now"):
      check_resume(str(workdir), first.override([change]))
  assert (workdir / "train_config.yaml").read_text() == saved
  check_resume(str(tmp_path / "fresh"), TrainConfig())  # no checkpoints: nothing to compare


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_errors_are_one_line(code, tmp_path, monkeypatch, capsys):
  from mixtral_jax.checkpoint import commands

  def full(args):
    raise OSError(code, os.strerror(code), str(tmp_path / "dst" / "params"))

  monkeypatch.setattr(commands, "export_main", full)
  assert cli(["export", "a", "b"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and str(tmp_path / "dst") in err and cli_lib.DISK_ERRNOS[code] in err


def test_preempted_exit_code_is_documented():
  assert PREEMPTED_EXIT_CODE == 75
  doc = open(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "faults.md")).read()
  assert "75" in doc and "PREEMPTED_EXIT_CODE" in doc


# ------------------------------------------------------------------------------------ tokenize

def test_tokenize_rebuilds_a_deleted_or_corrupt_shard(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(4):
    (src / f"doc{i}.txt").write_text(" ".join(["alpha beta gamma"] * (200 + i)) + "\n")
  out = str(tmp_path / "shards")
  spec = data_lib.TokenizeSpec(tokenizer=Tokenizer.load("v1").path, heldout_fraction=0.0, shard_mb=0.001)
  manifest = data_lib.tokenize([str(src)], out, spec, progress=False, log=lambda _: None)
  names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
  assert len(names) >= 2
  before = {n: open(os.path.join(out, f"{n}.tokens"), "rb").read() for n in names}
  os.remove(os.path.join(out, f"{names[0]}.tokens"))  # the advice: delete the shard (and its .json)
  os.remove(os.path.join(out, f"{names[0]}.json"))
  with open(os.path.join(out, f"{names[1]}.tokens"), "r+b") as f:  # and a flipped byte in another
    f.seek(3)
    b = f.read(1)
    f.seek(3)
    f.write(bytes([b[0] ^ 0xFF]))
  logs = []
  again = data_lib.tokenize([str(src)], out, spec, progress=False, log=logs.append)
  assert again == manifest and "rebuilding 2" in logs[0]
  after = {n: open(os.path.join(out, f"{n}.tokens"), "rb").read() for n in names}
  assert after == before
  logged = len(logs)
  assert data_lib.tokenize([str(src)], out, spec, progress=False, log=logs.append) == manifest
  assert len(logs) == logged  # nothing left to rebuild


# ------------------------------------------------------------------------------------ CLI environment

@pytest.mark.parametrize("argv, extra, module", [
    (["serve", "--model", "runs/x"], "serve", "fastapi"), (["eval", "harness", "--model", "runs/x"], "eval", "lm_eval")])
def test_missing_extra_is_one_line_naming_it(argv, extra, module, monkeypatch, capsys):
  real = cli_lib.importlib.util.find_spec
  monkeypatch.setattr(cli_lib.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
  assert cli(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"pip install 'mixtral-jax[{extra}]'" in err and module in err


QUIET = ("import sys; from mixtral_jax.cli import quiet_libtpu; {call}; import jax; jax.devices(); "
         "print('ok', flush=True)")


@pytest.mark.slow
def test_libtpu_start_up_line_is_silenced_without_a_tpu(tmp_path):
  import importlib.util
  import subprocess
  import sys
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("this check needs libtpu installed (the test extra pins it)")
  # Without JAX_PLATFORMS, XLA_FLAGS and any TPU_* variable: in-process CLI tests before this one ran
  # quiet_libtpu, which sets TPU_WORKER_HOSTNAMES & co. in this process's environment, silencing "before".
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS") and not k.startswith("TPU_")}
  # JAX_PLATFORMS unset, as for a user: every installed plugin (libtpu among them) is tried; another process
  # holding libtpu's lockfile (a parallel test) would keep libtpu from starting at all, hiding the line
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  run = lambda call: subprocess.run([sys.executable, "-c", QUIET.format(call=call)], env=env, cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
  before, after = run("pass"), run("quiet_libtpu('generate')")
  assert "TPU_WORKER_HOSTNAMES" in before.stderr  # the line, as users saw it
  assert after.returncode == 0 and "ok" in after.stdout
  assert "TPU_WORKER_HOSTNAMES" not in after.stderr and "E0000" not in after.stderr, after.stderr[-2000:]
