"""Ahead-of-time TPU compiles on this CPU host (libtpu's compiler, ``jax.experimental.topologies``): the
tiny train step lowers to the TPU kernels and collectives, and ``plan``'s HLO statistics read TPU HLO.

libtpu comes with the test extra (setup.cfg); without it these tests fail with the install hint.
The references are independent of the code under test: the same program compiled by XLA:CPU (whose
matmuls are ``dot``s with known trip counts, where the TPU compiler writes ``convolution``s in fusions
and loops without trip counts), closed-form counts, and the TPU compiler's own error message.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixtral_jax.config import MixtralConfig
from mixtral_jax.sharding.mesh import make_mesh
from mixtral_jax.train.plan import topology
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.plan.hlo_stats import hlo_stats
from mixtral_jax.train.plan.training import compile_or_verdict
from mixtral_jax.train.step import build_train_step
from reference import TINY

pytestmark = pytest.mark.libtpu

# Small enough to compile for TPU in seconds; bf16 compute as in training at scale.
CFG = MixtralConfig(**{**TINY, "num_hidden_layers": 2, "vocab_size": 512}, dtype="bfloat16", remat="full")
BATCH, SEQ = 8, 128


@pytest.fixture(scope="module")
def v5p():
  return topology.tpu_devices("v5p-8")  # v5p:2x2x1, 4 chips


def _train_hlo(cfg, mesh):
  tc = TrainConfig().override({"data.batch_size": BATCH, "data.seq_len": SEQ})
  fn, state, batch = build_train_step(cfg, tc, mesh)
  # Under conftest's jax_default_matmul_precision="highest" (CPU exactness): the splash kernel must
  # still compile, forward and backward (it traces its matmuls at the default precision, see
  # mixtral_jax.attn.splash; otherwise Mosaic refuses fp32 contraction of bf16: "Bad lhs type").
  assert jax.config.jax_default_matmul_precision == "highest"
  with jax.set_mesh(mesh):
    return fn.lower(state, batch).compile()


def test_topology_names():
  assert topology.tpu_topology("v5p-128") == "v5p:4x4x4"  # 128 TensorCores = 64 chips
  assert topology.tpu_topology("v5p-256") == "v5p:4x4x8"
  assert topology.tpu_topology("v4-32") == "v4:2x2x4"
  assert topology.tpu_topology("v5litepod-16") == "v5e:4x4"
  assert topology.tpu_topology("v6e-64") == "v6e:8x8"
  assert topology.tpu_topology("v5p:2x2x1") == "v5p:2x2x1"
  with pytest.raises(ValueError, match="v5p-8, v5p-16"):
    topology.tpu_topology("v5p-12")
  assert len(topology.tpu_devices("v5p-128")) == 64


def test_train_step_lowers_to_splash_and_ragged_all_to_all(v5p):
  """The tiny train step with splash attention and dropless expert parallelism compiles for TPU on this
  CPU host, with the Mosaic kernels (splash forward and backward, ragged_dot) and ragged-all-to-all:
  the mesh's platform (TPU), not this process's default backend (CPU), picks them."""
  mesh = make_mesh("expert=4", devices=v5p, num_experts=8)
  text = _train_hlo(CFG.replace(capacity_factor=None, moe_impl="auto", attention_impl="splash"), mesh).as_text()
  stats = hlo_stats(text)
  assert "ragged-all-to-all" in text and "tpu_custom_call" in text
  assert stats["ragged_all_to_all_ops"] >= 2 * 2 * CFG.num_hidden_layers  # there and back, fwd + bwd, per layer
  kernels = stats["mosaic_kernels"]
  assert any(k.startswith("splash_mha_fwd") for k in kernels), kernels
  assert any(k.startswith("splash_mha_dq") for k in kernels) and any(k.startswith("splash_mha_dkv") for k in kernels)
  assert any(k.startswith("ragged-dot") for k in kernels), kernels  # ragged_dot is a Mosaic kernel on TPU


def _moe_stack_hlo(devices):
  """Gradient of a 2-layer scanned stack of expert-parallel MoE blocks (capacity dispatch, bf16) on
  expert=4: all-to-alls, batched expert matmuls and routing inside a loop, compiled for ``devices``."""
  from mixtral_jax import routing
  from mixtral_jax.sharding.expert_parallel import moe_expert_parallel

  mesh = make_mesh("expert=4", devices=devices, num_experts=8)
  L, N, D, F, E = 2, 512, 64, 128, 8
  sh = lambda *spec: NamedSharding(mesh, P(*spec))
  args = (jax.ShapeDtypeStruct((N, D), jnp.bfloat16, sharding=sh("expert")),
          jax.ShapeDtypeStruct((L, D, E), jnp.bfloat16, sharding=sh()),
          jax.ShapeDtypeStruct((L, E, D, F), jnp.bfloat16, sharding=sh(None, "expert")),
          jax.ShapeDtypeStruct((L, E, D, F), jnp.bfloat16, sharding=sh(None, "expert")),
          jax.ShapeDtypeStruct((L, E, F, D), jnp.bfloat16, sharding=sh(None, "expert")))

  def loss(x, router, w1, w3, w2):
    def layer(x, ws):
      w, ids = routing.top_k_route((x @ ws[0]).astype(jnp.float32), 2)
      y, _ = moe_expert_parallel(x, w, ids, *ws[1:], capacity_factor=1.25)
      return x + y, None
    return jnp.sum(jax.lax.scan(layer, x, (router, w1, w3, w2))[0].astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))).lower(*args).compile()
  C = routing.capacity(N // 4, 2, E, 1.25)
  return compiled, L * 4 * E * C * D * 2  # closed form: 2 exchanges forward, 2 transposed, [E, C, D] bf16


def test_tpu_hlo_stats_equal_the_cpu_compile_of_the_same_program(v5p):
  """FLOPs from the TPU program (convolutions in fusions, loops whose trip counts come from their
  conditions) equal those of XLA:CPU's (dots, known trip counts); the all-to-all bytes equal the
  closed form on TPU (bf16 layouts with tiling) and twice it on XLA:CPU (which carries bf16 as f32)."""
  tpu, a2a = _moe_stack_hlo(v5p)
  cpu, _ = _moe_stack_hlo(jax.devices()[:4])
  t, c = hlo_stats(tpu.as_text()), hlo_stats(cpu.as_text())
  assert "known_trip_count" not in tpu.as_text() and "convolution" in tpu.as_text()
  assert t["unknown_trip_loops"] == 0 and c["unknown_trip_loops"] == 0
  # Within 1%: the TPU compiler may turn a tiny matmul (the D x 8 router's) into multiply-and-reduce.
  assert t["flops"] > 0 and t["flops"] == pytest.approx(c["flops"], rel=1e-2)
  assert t["all_to_all_bytes"] == a2a and c["all_to_all_bytes"] == 2 * a2a
  assert tpu.cost_analysis()["flops"] < 0.75 * t["flops"]  # XLA's own count sees the loop body once


def test_scan_flops_on_tpu_hlo():
  """A 7-step scan of a [16,32] x [32,32] matmul, with its gradient: exactly 7 x 3 matmuls."""
  devices = topology.tpu_devices("v5p:2x2x1")
  mesh = Mesh(np.array(devices[:1]), ("x",))
  spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P()))

  def f(w_LDD, x_BD):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_BD, w_LDD)[0].sum()

  text = jax.jit(jax.grad(f)).lower(spec((7, 32, 32)), spec((16, 32))).compile().as_text()
  assert "known_trip_count" not in text  # the TPU compiler does not print it: we read the condition
  assert hlo_stats(text)["flops"] == 7 * 3 * 2 * 16 * 32 * 32


# The TPU compiler's refusal of 8x7B 64 x 32768 on v5p-128 with remat offload_projections (libtpu 0.0.42,
# docs/benchmarks.md, "TPU pods"), first lines: the expert products offloaded per device exceed its host.
HOST_REFUSAL = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space host. "
                "Used 184.00G of 128.00G host. Exceeded host capacity by 56.00G.\n\nProgram host requirement "
                "184.00G:\n    HLO temp        184.00G (100.0% utilization)")


def test_host_memory_refusal_is_a_verdict():
  """Offloaded activations beyond the host memory the compiler models become a verdict naming host
  memory (needed and allowed per device), not an exception, and not read as a device (HBM) refusal."""
  class Refused:  # a lowered program whose compile fails with the given message, as the TPU compiler's did
    def __init__(self, message):
      self.message = message

    def compile(self):
      raise RuntimeError(self.message)

  compiled, verdict = compile_or_verdict(Refused(HOST_REFUSAL), 1000)
  assert compiled is None and verdict["oom"] and verdict["memory_space"] == "host"
  assert (verdict["host_temp_bytes"], verdict["host_available_bytes"]) == (184 * 2**30, 128 * 2**30)
  assert topology.parse_oom(HOST_REFUSAL) is None
  with pytest.raises(RuntimeError, match="not a memory error"):  # anything else still raises
    compile_or_verdict(Refused("RESOURCE_EXHAUSTED: not a memory error"), 1000)


def test_out_of_memory_is_a_verdict():
  """The TPU compiler's RESOURCE_EXHAUSTED becomes (needed, available), not an exception."""
  devices = topology.tpu_devices("v5litepod-4")
  mesh = Mesh(np.array(devices[:1]), ("x",))
  x = jax.ShapeDtypeStruct((100_000,), jnp.float32, sharding=NamedSharding(mesh, P()))

  def f(x):  # a [1e5, 1e5] float32 intermediate: 37 GiB, on a 16 GiB chip
    y = jnp.sin(x[:, None] * x[None, :])
    return jnp.sort(y, axis=1), y.T @ y

  compiled, verdict = compile_or_verdict(jax.jit(f).lower(x), 400_000)
  assert compiled is None and verdict["oom"]
  assert verdict["available_bytes"] == pytest.approx(topology.DEVICE_MEMORY["v5e"] * 2**30, rel=1e-3)
  assert verdict["temp_bytes"] > 37 * 2**30
  assert verdict["peak_bytes"] == verdict["temp_bytes"] + 400_000
