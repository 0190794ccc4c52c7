"""Time to first token with and without a cached prompt prefix, on the paged engine, in process.

  python benchmarks/prefix_cache.py [--preset bench-small] [--prefix 2000] [--kv-cache-gib 0.1]

A random ``--preset`` model serves, on the paged cache, one warm-up request of ``--prefix`` + 16 tokens
(compiling every prefill chunk shape), then a cold request with a new ``--prefix``-token prefix and 16
tokens of its own, then three requests sharing that prefix with other last 16 tokens (their prefix
pages come from the prefix cache). TTFT: submit -> first token, one token each, greedy.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="bench-small")
  p.add_argument("--prefix", type=int, default=2000)
  p.add_argument("--kv-cache-gib", type=float, default=0.1)
  args = p.parse_args()
  import mixtral_jax  # noqa: PLC0415
  from mixtral_jax.inference.engine import Engine, Request  # noqa: PLC0415

  model = mixtral_jax.create_model(mixtral_jax.get_config(args.preset), seed=0)
  engine = Engine(model, max_batch=4, max_context=args.prefix + 64, prefill_chunk=256, kv_cache_gib=args.kv_cache_gib)
  rng = np.random.default_rng(0)

  def ttft(prompt):
    done = threading.Event()
    req = Request(prompt, 1, lambda *_: None, lambda *_: done.set())
    t0 = time.perf_counter()
    engine.submit(req)
    while not done.is_set():
      engine.step()
    return time.perf_counter() - t0

  rand = lambda n: [int(t) for t in rng.integers(3, model.cfg.vocab_size, n)]  # noqa: E731
  ttft(rand(args.prefix + 16))  # compile
  shared = rand(args.prefix)
  cold = ttft(shared + rand(16))
  warm = [ttft(shared + rand(16)) for _ in range(3)]
  stats = engine.runner.pool.stats
  print(f"{args.preset}, prefix {args.prefix} tokens: cold TTFT {cold:.3f} s, cached-prefix TTFT "
        f"{np.median(warm):.3f} s (median of 3): {cold / np.median(warm):.1f}x; prefix-cache hit rate "
        f"{stats.hit_rate:.2f} of prompt tokens")


if __name__ == "__main__":
  main()
