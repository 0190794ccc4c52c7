"""Compile time of the forward+backward pass at 2 layers against 32 layers (scan keeps it flat).

  python benchmarks/compile_time.py [--preset tiny] [--repeats 3]

Lowers and compiles a loss-gradient function from abstract shapes (no weights are allocated) for the
layer-scanned model and, for comparison, the same model unrolled in a Python loop. Prints medians and
the 32-layer / 2-layer ratio of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import mixtral_jax
from mixtral_jax.params import abstract_model


def compile_seconds(cfg, *, unroll: bool, batch: int, seq: int) -> float:
  graphdef, state = nnx.split(abstract_model(cfg))

  def loss(state, ids):
    model = nnx.merge(graphdef, state)
    h, _ = model.hidden(ids, unroll=unroll)
    return jnp.mean(model.logits(h) ** 2)

  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  t0 = time.perf_counter()
  jax.jit(jax.grad(loss)).lower(state, ids).compile()
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=64)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, preset {args.preset}, median of {args.repeats}")
  for unroll in (False, True):
    med = {}
    for layers in (2, 32):
      cfg = mixtral_jax.get_config(args.preset, num_hidden_layers=layers)
      times = [compile_seconds(cfg, unroll=unroll, batch=args.batch, seq=args.seq) for _ in range(args.repeats)]
      med[layers] = statistics.median(times)
    name = "unrolled loop" if unroll else "nnx.scan     "
    print(f"{name}: L=2 {med[2]:6.2f} s   L=32 {med[32]:6.2f} s   ratio {med[32] / med[2]:5.2f}x")


if __name__ == "__main__":
  main()
