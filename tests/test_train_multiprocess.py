"""`mixtral-jax train` as 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1) on a
data=2,expert=4 mesh gives the losses of 1 process x 8 devices on the same mesh, and the checkpoint the
two processes wrote together carries a digest file that verifies, and that catches a changed value."""

import json
import os

import numpy as np
import pytest
import tensorstore as ts

from mixtral_jax.checkpoint import integrity
from mixtral_jax.train import loop
from test_train_loop import SMALL, small_config

pytestmark = pytest.mark.multiprocess

EXTRA = ["train.mesh=data=2,expert=4", "train.steps=4", "train.checkpoint_every=4", "train.eval_every=0"]


def test_two_processes_give_the_losses_of_one(child_env, free_port, run_all, tmp_path):
  workdir, port = str(tmp_path / "two"), free_port()
  env = child_env(JAX_DEFAULT_MATMUL_PRECISION="highest")  # as tests/conftest.py; --local-devices sets the count
  sets = [a for item in SMALL + EXTRA for a in ("--set", item)]
  run_all([["-m", "mixtral_jax.cli", "train", "--config", "tiny-pretrain", "--workdir", workdir, *sets,
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
            "--local-devices", "4"] for i in range(2)], env=env, timeout=400)
  two = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}

  one = loop.run(small_config(*EXTRA), str(tmp_path / "one")).losses
  assert sorted(two) == sorted(one) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4", "params"))

  # process 0 sealed the step after both processes' shares were written: every array verifies
  params = os.path.join(workdir, "checkpoints", "4", "params")
  assert integrity.verify(params) is True
  zarr3 = json.load(open(os.path.join(params, "_METADATA"))).get("use_zarr3")
  spec = {"driver": "zarr3" if zarr3 else "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{params}/", "path": "blocks.moe.w1_EDF"}}
  w1 = ts.open(spec, open=True).result()
  w1[0, 1, 2, 3].write(np.asarray(w1[0, 1, 2, 3].read().result()) + 1).result()
  with pytest.raises(integrity.ChecksumError, match=r"blocks\.moe\.w1_EDF \(layer 0\) fails its checksum"):
    integrity.verify(params)
