"""Attention forward+backward: blockwise (flash) against dense, time and peak temporaries.

  python benchmarks/attention.py [--T 512 2048 8192] [--windows none 1024] [--repeats 3]
                                 [--heads 8 2] [--head-dim 128] [--dtype float32] [--block 512]

Batch 1, causal self-attention with positions 0..T-1, 8x7B head shapes (H 128) with a few heads
(default 8 query / 2 kv heads). Each implementation's step is ``jax.value_and_grad`` of
``sum(attention(q, k, v) * w)`` with respect to q, k and v, jitted; its peak memory is the compiled
program's temporaries (``compiled.memory_analysis().temp_size_in_bytes``: everything XLA allocates
beyond the arguments and outputs, which both implementations share). After a warm-up call, the
``--repeats`` rounds run the implementations round-robin so that a shared machine's load hits all
alike; times are medians and the ratio is the median of per-round ratios.

Rows also report the kernel ``attention_impl=auto`` would choose on this platform, and "useful"
TFLOP/s: 12 * N * H * (visible query-key pairs) per step (2 matmuls forward, 4 backward, counting
only unmasked pairs, the FlashAttention convention), divided by the time. On a GPU the cuDNN kernel
is timed too (it computes in bf16/fp16: pass ``--dtype bfloat16`` to compare all three alike). A
dense step whose temporaries exceed ``--max-dense-gib`` is compiled (for its memory figure) but not
run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mixtral_jax.attn import blockwise_attention, choose, dense_attention  # noqa: E402
from mixtral_jax.attn.cudnn import cudnn_attention, cudnn_problem  # noqa: E402
from mixtral_jax.attn.mask import live_blocks  # noqa: E402
from mixtral_jax.sharding.mesh import current_platform  # noqa: E402

GIB = 1 << 30


def step_fn(impl: str, window, block: int):
  def attention(q, k, v, pos):
    if impl == "dense":
      return dense_attention(q, k, v, pos, pos, sliding_window=window)
    if impl == "blockwise":
      return blockwise_attention(q, k, v, pos, pos, sliding_window=window, block_q=block, block_k=block)
    return cudnn_attention(q, k, v, sliding_window=window)

  def loss(q, k, v, w, pos):
    return jnp.sum((attention(q, k, v, pos) * w).astype(jnp.float32))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def visible_pairs(T: int, window) -> int:
  W = T if window is None else min(window, T)
  return W * (W + 1) // 2 + (T - W) * W


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192])
  ap.add_argument("--windows", nargs="+", default=["none", "1024"])
  ap.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("N", "K"))
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--block", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--max-dense-gib", type=float, default=12.0)
  args = ap.parse_args()

  N, K = args.heads
  H, dt = args.head_dim, jnp.dtype(args.dtype)
  platform = current_platform()
  print(f"jax {jax.__version__} on {platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, "
        f"N={N} K={K} H={H} {dt.name}, block {args.block}, repeats {args.repeats}")
  print("| T | window | auto picks | impl | fwd+bwd s | useful TFLOP/s | temporaries GiB | live blocks |"
        " time vs dense | temp vs dense |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for T in args.T:
    for wname in args.windows:
      window = None if wname == "none" else int(wname)
      rs = np.random.RandomState(T)
      q = jnp.asarray(rs.normal(size=(1, T, N, H)), dt)
      k, v = (jnp.asarray(rs.normal(size=(1, T, K, H)), dt) for _ in range(2))
      w = jnp.asarray(rs.normal(size=(1, T, N, H)), dt)
      pos = jnp.arange(T, dtype=jnp.int32)[None]
      impls = ["dense", "blockwise"]
      if platform == "gpu" and not cudnn_problem(platform="gpu", T=T, S=T, head_dim=H, dtype=dt, index_aligned=True,
                                                 packed=False, padded=False):
        impls.append("cudnn")
      auto = choose("auto", platform=platform, T=T, S=T, head_dim=H, dtype=dt, index_aligned=True, packed=False,
                    padded=False)[0]
      b = min(args.block, T)
      nb = -(-T // b)
      blocks = jnp.arange(nb * b, dtype=jnp.int32).reshape(1, nb, b)
      live = int(live_blocks(blocks, blocks, sliding_window=window).sum())
      compiled, temp = {}, {}
      for impl in impls:
        c = step_fn(impl, window, args.block).lower(q, k, v, w, pos).compile()
        temp[impl] = c.memory_analysis().temp_size_in_bytes
        if impl == "dense" and temp[impl] > args.max_dense_gib * GIB:
          continue
        compiled[impl] = c
        jax.block_until_ready(c(q, k, v, w, pos))  # warm-up
      times = {impl: [] for impl in compiled}
      for _ in range(args.repeats):
        for impl, c in compiled.items():
          t = time.perf_counter()
          jax.block_until_ready(c(q, k, v, w, pos))
          times[impl].append(time.perf_counter() - t)
      flops = 12 * N * H * visible_pairs(T, window)
      for impl in impls:
        med = statistics.median(times[impl]) if impl in times else None
        if impl != "dense" and "dense" in times and impl in times:
          ratio = f"{statistics.median(a / b for a, b in zip(times[impl], times['dense'])):.2f}x"
        else:
          ratio = "-" if impl == "dense" else "n/a (dense not run)"
        tr = "-" if impl == "dense" else f"{temp[impl] / temp['dense']:.3f}x"
        print(f"| {T} | {wname} | {auto} | {impl} | {'not run' if med is None else f'{med:.3f}'} | "
              f"{'-' if med is None else f'{flops / med / 1e12:.3f}'} | {temp[impl] / GIB:.3f} | "
              f"{f'{live}/{nb * nb}' if impl == 'blockwise' else '-'} | {ratio} | {tr} |", flush=True)


if __name__ == "__main__":
  main()
