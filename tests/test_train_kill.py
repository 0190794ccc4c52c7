"""A training process killed with SIGKILL while an asynchronous checkpoint save is in flight leaves the
previous checkpoint restorable, and the next run resumes from it."""

import os
import signal
import subprocess
import sys
import textwrap

import orbax.checkpoint as ocp
import pytest

from mixtral_jax.train import loop
from test_train_loop import CACHE_FLAGS, N, compilation_cache, small_config

pytestmark = pytest.mark.subprocess_cli

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_train_loop import small_config
    from mixtral_jax.train import loop
    from mixtral_jax.train.checkpointing import Checkpointer

    save = Checkpointer.save
    def save_then_die(self, state, data_state, **kw):
      save(self, state, data_state, **kw)  # returns once the arrays are off the device; writing goes on
      if int(state.step) == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    Checkpointer.save = save_then_die
    loop.run(small_config("train.eval_every=0"), {workdir!r})
""")


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  cache = str(tmp_path / "jax_cache")  # shared with the child: the resumed run reuses its compiled step
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as tests/conftest.py, so the programs are identical
         **{flag.upper(): str(v) for flag, v in zip(CACHE_FLAGS, (cache, 0, 0))}}
  script = CHILD.format(tests=os.path.dirname(__file__), kill_at=2 * N, workdir=workdir)
  child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
  ckpts = os.path.join(workdir, "checkpoints")
  assert ocp.CheckpointManager(ckpts).all_steps() == [N]  # step 2N never completed

  with compilation_cache(cache):
    resumed = loop.run(small_config("train.eval_every=0"), workdir)
  assert resumed.start_step == N and resumed.final_step == 2 * N
  assert ocp.CheckpointManager(ckpts).all_steps() == [N, 2 * N]
