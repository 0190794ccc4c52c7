"""All-to-all bytes per token per MoE layer, read from the compiled HLO, against the ideal 2*k*D*bytes*cf.

  python benchmarks/all_to_all_bytes.py [--devices 8] [--tokens 4096] [--dtype float32]

Compiles the forward of one expert-parallel MoE layer (``moe_expert_parallel``) on an ``expert=DEVICES``
mesh of simulated CPU devices and sums the ``all-to-all`` operand bytes of the optimised HLO
(``mixtral_jax.train.plan.hlo_stats``), per device, divided by the device's tokens. A token's k routed
copies travel to their experts and back: 2*k*D*bytes, times the capacity factor for the padding of
the buckets. Dropless buckets are sized for the worst case (every token to every expert: 2*E*D*bytes);
the ragged path (GPU/TPU) sends only the routed rows. Use float32: XLA:CPU widens bfloat16 all-to-alls.
"""

from __future__ import annotations

import argparse
import os


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--tokens", type=int, default=4096, help="global tokens (N)")
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--ffn", type=int, default=1792)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

  import jax
  import jax.numpy as jnp

  from mixtral_jax.sharding import make_mesh
  from mixtral_jax.sharding.expert_parallel import moe_expert_parallel
  from mixtral_jax.train.plan.hlo_stats import hlo_stats

  N, D, F, E, k = args.tokens, args.hidden, args.ffn, 8, 2
  dt = jnp.dtype(args.dtype)
  mesh = make_mesh(f"expert={args.devices}", num_experts=E)
  shapes = [jax.ShapeDtypeStruct(s, d) for s, d in [((N, D), dt), ((N, k), jnp.float32), ((N, k), jnp.int32),
                                                     ((E, D, F), dt), ((E, D, F), dt), ((E, F, D), dt)]]
  n = N // args.devices
  print(f"{args.devices} devices (expert={args.devices}), {n} tokens per device, D {D}, {args.dtype}")
  print(f"{'dispatch':<18}{'HLO bytes/token':>16}{'ideal':>10}{'ratio':>8}")
  for cf in (1.0, 1.25, 2.0, None):
    def layer(*a, cf=cf):
      return moe_expert_parallel(*a, capacity_factor=cf, impl="blocked", block=128)[0]
    with jax.set_mesh(mesh):
      hlo = jax.jit(layer).lower(*shapes).compile().as_text()
    per_token = hlo_stats(hlo)["all_to_all_bytes"] / n
    ideal = 2 * k * D * dt.itemsize * (cf if cf is not None else E / k)
    name = f"dropping cf {cf}" if cf is not None else "dropless buckets"
    print(f"{name:<18}{per_token:16.1f}{ideal:10.1f}{per_token / ideal:8.3f}")


if __name__ == "__main__":
  main()
