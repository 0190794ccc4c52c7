"""Compiled FLOPs of the dropless MoE layer on an H100, deviceless, against the top-k FLOPs.

  JAX_PLATFORMS=cpu python benchmarks/moe_gpu_flops.py --target h100_sxm.txtpb   # 8x7B widths

Needs the CUDA plugin (``pip install "jax[cuda12]==<jax version>"``) and a ``GpuTargetConfigProto`` text
file (XLA's ``xla/backends/gpu/target_config/specs/h100_sxm.txtpb``, ``collective_memory_granularity``
dropped, a cuDNN version set). Compiles the model's own ``MoE`` block (router, top-k, sort, experts,
combine), forward and ``value_and_grad``, on one compile-only H100 with ``moe_impl`` auto (``triton`` on
GPU), and counts:

* dots in the optimised HLO (``train.hlo_stats``: the router and anything XLA left as a dot);
* each grouped-GEMM kernel (``__gpu$xla.gpu.triton`` custom call) as ``2 * M * K * N`` from its shapes:
  ``[M, K] x [G, K, N] -> [M, N]`` (forward, dlhs) or ``[M, K], [M, N] -> [G, K, N]`` (drhs), M the rows;

against the top-k FLOPs ``2 * N * k * 3 * D * F`` (times 3 with the backward) plus the router's.
Timings need a real GPU (benchmarks/accelerator.py); this checks that nothing computes an expert over
rows it does not own.
"""

from __future__ import annotations

import argparse
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from mixtral_jax.config import MixtralConfig  # noqa: E402
from mixtral_jax.moe import MoE  # noqa: E402
from mixtral_jax.train.hlo_stats import hlo_stats  # noqa: E402

_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def _dims(text):
  return [tuple(int(d) for d in m.split(",") if d) for m in _SHAPE.findall(text)]


def kernel_flops(hlo: str) -> tuple[int, int]:
  """(grouped-GEMM FLOPs, kernel count) of the Triton custom calls in ``hlo`` (rule in the docstring)."""
  shapes = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+\[[0-9,]*\])", line)
    if m:
      shapes[m.group(1)] = _dims(m.group(2))[0]
  total = count = 0
  for line in hlo.splitlines():
    if 'custom_call_target="__gpu$xla.gpu.triton"' not in line:
      continue
    out = _dims(line.split("custom-call(")[0].split("=", 1)[1])[0]
    ops = [shapes.get(o.strip().lstrip("%"), ()) for o in line.split("custom-call(", 1)[1].split(")", 1)[0].split(",")]
    three = [s for s in ops if len(s) == 3]
    two = [s for s in ops if len(s) == 2 and s[0] > 1]
    if len(out) == 2 and three:  # [M, K] x [G, K, N] -> [M, N]
      total += 2 * out[0] * three[0][1] * three[0][2]
    elif len(out) == 3 and two:  # [M, K], [M, N] -> [G, K, N]
      total += 2 * two[0][0] * out[1] * out[2]
    count += 1
  return total, count


def compile_moe(cfg: MixtralConfig, tokens: int, target: str, grad: bool):
  device = topologies.get_topology_desc(platform="cuda", target_config=open(target).read(), topology="1x1x1").devices[0]
  mesh = jax.sharding.Mesh([device], ("data",))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)  # noqa: E731
  x = jax.ShapeDtypeStruct((tokens, cfg.hidden_size), jnp.dtype(cfg.dtype), sharding=rep)

  def loss(state, x_ND):
    y, _, _ = nnx.merge(graphdef, state)(x_ND[None])
    return jnp.sum(y.astype(jnp.float32))

  fn = jax.value_and_grad(loss, argnums=(0, 1)) if grad else loss
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(jax.tree.map(abstract, state), x).compile().as_text()


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--target", required=True, help="GpuTargetConfigProto text file (e.g. h100_sxm.txtpb)")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--hidden", type=int, default=4096)
  p.add_argument("--ffn", type=int, default=14336)
  args = p.parse_args()
  N, D, F, E, k = args.tokens, args.hidden, args.ffn, 8, 2
  cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                      dtype="bfloat16", param_dtype="bfloat16")
  for grad in (False, True):
    hlo = compile_moe(cfg, N, args.target, grad)
    dots = hlo_stats(hlo)["flops"]
    kern, count = kernel_flops(hlo)
    passes = 3 if grad else 1
    top_k = passes * 2 * N * k * 3 * D * F
    router = passes * 2 * N * D * E
    what = "forward+backward" if grad else "forward"
    print(f"{what}: {count} grouped-GEMM kernels {kern / 1e12:.3f} TFLOP + dots {dots / 1e12:.3f} TFLOP = "
          f"{(kern + dots) / 1e12:.3f}; top-{k} experts {top_k / 1e12:.3f} + router {router / 1e12:.4f}; "
          f"ratio {(kern + dots) / (top_k + router):.4f} (vs experts alone {(kern + dots) / top_k:.4f})")


if __name__ == "__main__":
  main()
