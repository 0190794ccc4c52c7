"""One MoE layer's decode dispatch on CPU: the blocked dropless path against ``dispatch_selected`` with
per-expert arrays (what the MoE layer chooses between when given per-expert views), bench-small sizes.

  JAX_PLATFORMS=cpu python benchmarks/moe_decode_dispatch.py [--rows 1,4,8,16,32]

Prints, per number of rows N (one token each, k = 2), the best of 7 calls of each path in ms and the
largest difference of their outputs.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import moe, routing

E, D, F = 8, 512, 1792


def best_ms(f, *args, repeats=7):
  f(*args).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="1,4,8,16,32")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  w1_EDF, w3_EDF = (jnp.asarray(rng.standard_normal((E, D, F), np.float32) * 0.02) for _ in range(2))
  w2_EFD = jnp.asarray(rng.standard_normal((E, F, D), np.float32) * 0.02)
  views = tuple(tuple(jax.device_put(np.asarray(w)[e]) for e in range(E)) for w in (w1_EDF, w3_EDF, w2_EFD))
  blocked = jax.jit(lambda x, w, i: moe.dispatch_dropless(x, w, i, w1_EDF, w3_EDF, w2_EFD, impl="blocked", block=128))
  selected = jax.jit(lambda x, w, i, v: moe.dispatch_selected(x, w, i, w1_EDF, w3_EDF, w2_EFD, v))
  for N in map(int, args.rows.split(",")):
    x_ND = jnp.asarray(rng.standard_normal((N, D), np.float32))
    weights_Nk, ids_Nk = routing.top_k_route(jnp.asarray(rng.standard_normal((N, E), np.float32)), 2)
    diff = float(jnp.abs(blocked(x_ND, weights_Nk, ids_Nk) - selected(x_ND, weights_Nk, ids_Nk, views)).max())
    print(f"N={N:3d}: blocked dropless {best_ms(blocked, x_ND, weights_Nk, ids_Nk):8.2f} ms, "
          f"selected {best_ms(selected, x_ND, weights_Nk, ids_Nk, views):8.2f} ms, max |diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
  main()
