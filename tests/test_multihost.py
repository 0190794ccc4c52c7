"""2 processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo collectives) run forward and backward
of the expert-parallel model; the results equal 1 process x 8 devices."""

import os

import numpy as np
import pytest

from multihost_worker import run_model
from mixtral_jax.sharding import distributed

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


@pytest.mark.multiprocess
def test_two_processes_equal_one(child_env, free_port, run_all, tmp_path):
  port, out = free_port(), tmp_path / "out.npz"
  run_all([[WORKER, str(i), "2", str(port), str(out)] for i in range(2)], env=child_env(), timeout=300)

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
