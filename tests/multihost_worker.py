"""One process of the multi-process test (tests/test_multihost.py), and the computation both sides run.

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Starts ``jax.distributed`` over 127.0.0.1 with 8 / NUM_PROCESSES simulated CPU devices per process, builds
the tiny model on the ``expert=8`` mesh (the expert all-to-all crosses processes), feeds this process's
rows of the global batch, and has process 0 write the loss, logits and gradients.
"""

import os
import sys

MESH = "expert=8"


def run_model():
  """Loss, logits and parameter gradients (as host arrays) of the dropless EP model on ``MESH``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.experimental import multihost_utils

  from mixtral_jax.config import MixtralConfig
  from mixtral_jax.params import create_model
  from mixtral_jax.sharding import make_mesh
  from mixtral_jax.sharding.distributed import process_batch_slice
  from mixtral_jax.sharding.rules import logical_sharding
  from reference import TINY

  cfg = MixtralConfig(**{**TINY, "num_hidden_layers": 2}, moe_block=8)
  mesh = make_mesh(MESH, num_experts=cfg.num_local_experts)
  B, T = 8, 12
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  sharding = logical_sharding(("batch", "seq"), mesh)
  rows = process_batch_slice(B, sharding, global_shape=(B, T))
  ids = jax.make_array_from_process_local_data(sharding, ids[rows], (B, T))

  graphdef, state = nnx.split(create_model(cfg, seed=0, mesh=mesh), nnx.Param)

  def loss_fn(state, ids):
    logits = nnx.merge(graphdef, state)(ids)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)), logits

  with jax.set_mesh(mesh):
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state, ids)
  flat = {"/".join(map(str, path)): g[...] for path, g in nnx.to_flat_state(grads)}
  out = multihost_utils.process_allgather({"loss": loss, "logits": logits, **flat}, tiled=True)
  return {k: np.asarray(v) for k, v in out.items()}


def main():
  process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(__file__))
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  from mixtral_jax.sharding import distributed
  assert distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                                local_device_count=8 // num_processes)
  assert jax.device_count() == 8 and jax.local_device_count() == 8 // num_processes
  results = run_model()
  if process_id == 0:
    import numpy as np
    np.savez(out, **results)


if __name__ == "__main__":
  main()
