"""The ragged expert-parallel path (``ragged_all_to_all`` + ``ragged_dot``) against the bucketed dropless
path, on whatever accelerator is present (XLA:CPU has no ``ragged_all_to_all``: run this on a GPU/TPU).

  python benchmarks/ragged_ep.py [--mesh expert=1] [--tokens 2048]

1. Correctness in float32 (matmul precision ``highest``): outputs and gradients (input and the three
   expert weights) of ``moe_expert_parallel`` in ragged mode against bucketed dropless mode and against
   single-device ``dispatch_dropless``; prints the relative errors (expect ~1e-6).
2. Timing in bfloat16: forward+backward of the ragged and bucketed EP paths; prints medians and ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import routing
from mixtral_jax.moe import dispatch_dropless
from mixtral_jax.sharding import format_mesh, make_mesh
from mixtral_jax.sharding.expert_parallel import dispatch_mode, moe_expert_parallel


def problem(N, D, F, E, k, dtype):
  ks = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(ks[0], (N, D))
  weights, ids = routing.top_k_route(jax.random.normal(ks[1], (N, E)) * 2, k)
  w1, w3 = (0.05 * jax.random.normal(kk, (E, D, F)) for kk in ks[2:4])
  w2 = 0.05 * jax.random.normal(ks[4], (E, F, D))
  ct = jax.random.normal(ks[5], (N, D))
  cast = lambda a: a.astype(dtype)
  return cast(x), weights, ids, cast(w1), cast(w3), cast(w2), ct


def loss_fn(dispatch):
  def f(x, w1, w3, w2, weights, ids, ct):
    return jnp.sum(dispatch(x, weights, ids, w1, w3, w2).astype(jnp.float32) * ct)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


def ep(impl):
  return lambda *a: moe_expert_parallel(*a, capacity_factor=None, impl=impl, block=128)[0]


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def median_time(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mesh", default=None, help="mesh spec; default expert=<device count>")
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--ffn", type=int, default=1792)
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  N, D, F, E, k = args.tokens, args.hidden, args.ffn, 8, 2
  mesh = make_mesh(args.mesh or f"expert={jax.device_count()}", num_experts=E)
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"mesh {format_mesh(mesh)}, {N} tokens, D {D}, F {F}, E {E}, k {k}")

  with jax.default_matmul_precision("highest"):
    x, weights, ids, w1, w3, w2, ct = problem(N, D, F, E, k, jnp.float32)
    single = loss_fn(lambda *a: dispatch_dropless(*a, impl="blocked", block=128))
    ref_loss, ref_grads = single(x, w1, w3, w2, weights, ids, ct)
    with jax.set_mesh(mesh):
      for impl in ("ragged", "blocked"):
        loss, grads = loss_fn(ep(impl))(x, w1, w3, w2, weights, ids, ct)
        errs = ", ".join(f"{n} {rel(g, r):.1e}" for n, g, r in zip(("dx", "dw1", "dw3", "dw2"), grads, ref_grads))
        impl = dispatch_mode(None, impl)  # what actually ran (ragged falls back to blocked on CPU)
        print(f"fp32 EP {impl:<8} vs single-device dropless: loss {rel(loss, ref_loss):.1e}, {errs}")

  x, weights, ids, w1, w3, w2, ct = problem(N, D, F, E, k, jnp.bfloat16)
  with jax.set_mesh(mesh):
    times = {impl: median_time(loss_fn(ep(impl)), (x, w1, w3, w2, weights, ids, ct), args.repeats)
             for impl in ("ragged", "blocked")}
  for impl, t in times.items():
    print(f"bf16 EP {dispatch_mode(None, impl):<8} fwd+bwd {t * 1e3:8.3f} ms   {t / times['blocked']:5.2f}x bucketed dropless")


if __name__ == "__main__":
  main()
