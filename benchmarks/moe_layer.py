"""MoE layer forward+backward against a dense SiLU-gated FFN of the same active size (hidden k*F).

  python benchmarks/moe_layer.py                       # the issue's CPU setting: fp32, one device
  python benchmarks/moe_layer.py --dtype bfloat16      # e.g. on a GPU

Same tokens for every variant (2048 x D 512, F 1792, E 8, k 2 by default). The MoE variants are the
model's own ``MoE`` block (router, top-k, dispatch, experts, combine):

* ``dropping``: capacity factor 1.25 (default 1.25), capacity buckets and one batched einsum;
* ``dropless``: the grouped FFN over the true group sizes (``moe_impl`` auto: blocked on CPU,
  ``ragged_dot`` on GPU/TPU).

The dense FFN has no router. Prints the median seconds of a jitted ``value_and_grad`` (input and all
parameters), timed round-robin across the variants so they share the machine's load, and each MoE
variant's ratio to the dense FFN measured in the same run. The arithmetic alone
of dropping at cf is cf times the dense FFN's (plus the router).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import MixtralConfig
from mixtral_jax.moe import MoE


def interleaved_medians(calls: dict, repeats: int) -> dict:
  """Median seconds of each call, timed round-robin so that every variant sees the same machine load."""
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def dense_ffn_step(D, F, dtype):
  """value_and_grad of a SiLU-gated FFN y = w2(silu(x w1) * x w3), hidden F."""
  keys = jax.random.split(jax.random.key(1), 3)
  params = {"w1": 0.02 * jax.random.normal(keys[0], (D, F)), "w3": 0.02 * jax.random.normal(keys[1], (D, F)),
            "w2": 0.02 * jax.random.normal(keys[2], (F, D))}

  def loss(params, x_ND, ct_ND):
    p = {k: v.astype(dtype) for k, v in params.items()}
    y = (jax.nn.silu(x_ND @ p["w1"]) * (x_ND @ p["w3"])) @ p["w2"]
    return jnp.sum(y.astype(jnp.float32) * ct_ND)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def moe_step(cfg: MixtralConfig):
  graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))

  def loss(state, x_ND, ct_ND):
    y, _, _ = nnx.merge(graphdef, state)(x_ND[None])
    return jnp.sum(y[0].astype(jnp.float32) * ct_ND)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), state


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--hidden", type=int, default=512, help="D")
  p.add_argument("--ffn", type=int, default=1792, help="F of one expert")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--capacity-factor", type=float, default=1.25)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--moe-block", type=int, default=128, help="row block of the blocked kernel (CPU)")
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args()

  N, D, F, E, k = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
  dtype = jnp.dtype(args.dtype)
  x = jax.random.normal(jax.random.key(2), (N, D), jnp.float32).astype(dtype)
  ct = jax.random.normal(jax.random.key(3), (N, D), jnp.float32)
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"{N} tokens, D {D}, F {F}, E {E}, k {k}, {args.dtype}")

  dense, dense_params = dense_ffn_step(D, k * F, dtype)
  dense_name = f"dense FFN (hidden {k * F})"
  calls = {dense_name: (dense, (dense_params, x, ct))}
  base = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                       dtype=args.dtype, moe_block=args.moe_block)
  variants = {f"MoE dropping cf {args.capacity_factor}": base.replace(capacity_factor=args.capacity_factor),
              "MoE dropless": base}
  for name, cfg in variants.items():
    step, state = moe_step(cfg)
    calls[name] = (step, (state, x, ct))
  medians = interleaved_medians(calls, args.repeats)
  for name, t in medians.items():
    print(f"{name:<30} {t * 1e3:8.2f} ms   {t / medians[dense_name]:5.2f}x dense")


if __name__ == "__main__":
  main()
