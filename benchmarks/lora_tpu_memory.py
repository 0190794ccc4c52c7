"""Per-chip memory of the train step (LoRA or full) compiled ahead of time for a TPU topology with libtpu,
on a CPU-only machine (no device is touched). Until ``plan`` compiles for TPU topologies itself.

  python benchmarks/lora_tpu_memory.py mixtral-8x7b v5p:2x2x1 expert=4 4 8192 16     # LoRA rank 16
  python benchmarks/lora_tpu_memory.py mixtral-8x7b v5p:2x2x1 expert=4 4 8192 full   # full fine-tuning

Prints one JSON line: argument, output, alias and temporary bytes (GiB) and their peak. Set
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` when another process holds libtpu's lock file, and
``TPU_WORKER_HOSTNAMES=localhost`` to quiet its start-up.
"""

import json
import os
import sys

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-16")

import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from mixtral_jax.config import get_config  # noqa: E402
from mixtral_jax.sharding.mesh import MESH_AXES, parse_mesh  # noqa: E402
from mixtral_jax.train.config import TrainConfig  # noqa: E402
from mixtral_jax.train.step import build_train_step  # noqa: E402

GiB = 2**30


def main():
  preset, topology, mesh_spec, batch, seq, lora = sys.argv[1:7]
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  sizes = {a: 1 for a in MESH_AXES} | parse_mesh(mesh_spec)
  mesh = Mesh(np.array(devices).reshape(tuple(sizes[a] for a in MESH_AXES)), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))
  cfg = get_config(preset, dtype="bfloat16", remat="full", capacity_factor=1.25)
  tc = TrainConfig().override({"data.batch_size": int(batch), "data.seq_len": int(seq),
                               "lora.rank": None if lora == "full" else int(lora)})
  step_fn, state, batch_abs = build_train_step(cfg, tc, mesh)
  m = step_fn.lower(state, batch_abs).compile().memory_analysis()
  out = {k: getattr(m, k) / GiB for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                           "temp_size_in_bytes")}
  out["peak"] = out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"] + \
      out["temp_size_in_bytes"]
  print(json.dumps({"preset": preset, "topology": topology, "mesh": mesh_spec, "batch": int(batch), "seq": int(seq),
                    "lora": lora, **out}))


if __name__ == "__main__":
  main()
