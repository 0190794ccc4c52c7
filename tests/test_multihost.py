"""2 processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo collectives) run forward and backward
of the expert-parallel model; the results equal 1 process x 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from multihost_worker import run_model
from mixtral_jax.sharding import distributed

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  port, out = _free_port(), tmp_path / "out.npz"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own device count
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process workers timed out:\n" + "\n".join(logs))
  assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)[-6000:]

  two = dict(np.load(out))
  one = run_model()  # this process: 1 process x 8 simulated devices
  assert set(two) == set(one)
  for name, ref in one.items():
    err = np.abs(two[name] - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= 1e-5, (name, err)


def test_single_process_needs_no_setup(monkeypatch):
  for var in ("MIXTRAL_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "MIXTRAL_NUM_PROCESSES", "JAX_NUM_PROCESSES",
              "MIXTRAL_PROCESS_ID", "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
              "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  with pytest.raises(ValueError, match="missing process_id"):
    distributed.initialize(coordinator="127.0.0.1:1234", num_processes=2)
  assert distributed.process_batch_slice(8) == slice(0, 8)
  monkeypatch.setattr("jax.process_count", lambda: 2)
  monkeypatch.setattr("jax.process_index", lambda: 1)
  assert distributed.process_batch_slice(8) == slice(4, 8)
  with pytest.raises(ValueError, match="does not split over 2 processes"):
    distributed.process_batch_slice(7)
