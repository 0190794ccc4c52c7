"""Deviceless XLA:GPU compiles on this CPU host (JAX's CUDA plugin, ``jax.experimental.topologies``): the
tiny train step, prefill and decode compiled for 8 H100s, and ``plan``'s GPU topologies and HLO statistics.

The CUDA plugin comes with the test extra (setup.cfg); without it these tests fail with the install hint.
References, independent of the code under test: closed-form byte and FLOP counts, XLA:CPU's compile of
the same program (synchronous all-to-alls, whose types are the output alone), XLA's own spec file
figures, and the custom-call targets that cuDNN, Triton and Mosaic GPU kernels carry in GPU HLO.

Two assertions wait for the GPU kernels of issue 18 (experts on a grouped GEMM, training attention on a
fused kernel): ``test_train_step_dropless_uses_fused_kernels`` fails until they are merged.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixtral_jax.config import MixtralConfig
from mixtral_jax.sharding.mesh import make_mesh
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.plan import analytic, compiling, hlo_stats, plan_serving, topology
from mixtral_jax.train.step import build_train_step
from reference import TINY

pytestmark = pytest.mark.gpu_compile

# F = 80 and two local experts (expert=4 of 8): an expanded grouped matmul would contract 2 x 64 = 128
# or 2 x 80 = 160, sizes no other dot of this program has (seq 48, head 16, D 64, F 80, vocab 512).
CFG = MixtralConfig(**{**TINY, "num_hidden_layers": 2, "vocab_size": 512, "intermediate_size": 80},
                    dtype="bfloat16", remat="full")
BATCH, SEQ = 8, 48
FUSED_ATTENTION = ("__cudnn$fmha", "__gpu$xla.gpu.triton", "mosaic_gpu")  # cuDNN, or a Pallas flash kernel
GROUPED_GEMM = ("__gpu$xla.gpu.triton", "mosaic_gpu")  # tokamax.ragged_dot: Triton or Mosaic GPU


@pytest.fixture(scope="module")
def h100():
  return topology.gpu_devices("h100x8")


def _train_text(cfg, mesh):
  tc = TrainConfig().override({"data.batch_size": BATCH, "data.seq_len": SEQ})
  fn, state, batch = build_train_step(cfg, tc, mesh)
  with jax.set_mesh(mesh):
    return fn.lower(state, batch).compile().as_text()


def _targets(text):
  return set(hlo_stats(text)["custom_calls"])


def test_gpu_topology_names_and_bad_input(monkeypatch):
  assert topology.parse_gpu_topology("h100x8") == (1, "h100", 8)
  assert topology.parse_gpu_topology("2xh100x8") == (2, "h100", 8)
  assert topology.parse_gpu_topology("h200") == (1, "h200", 1)
  assert topology.is_gpu_topology("h200x8") and not topology.is_gpu_topology("v5p-128")
  assert not topology.is_gpu_topology("v5p:2x2x1")
  with pytest.raises(ValueError, match="unknown GPU 'a100'; known cards: h100, h200"):
    topology.parse_gpu_topology("a100x8")
  with pytest.raises(ValueError, match="has 2; choose a larger topology or a smaller --mesh"):
    compiling.topology_devices("h100x2", 8)
  # No CUDA plugin: the error names the install command for this jax version.
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "jax_plugins.xla_cuda12" else find_spec(name, *a))
  with pytest.raises(ValueError, match=rf'pip install "jax\[cuda12\]=={jax.__version__}"'):
    topology.gpu_devices("h100x8")


def test_gpu_devices_and_memory_verdict(h100):
  """Compile-only devices of the shipped target configs; --device's verdict comes from the card, and
  agrees with the memory in XLA's spec file (which counts a little less than CUDA reports)."""
  assert len(h100) == 8 and h100[0].device_kind == "NVIDIA H100 80GB HBM3"
  assert len(topology.gpu_devices("2xh100x8")) == 16
  h200 = topology.gpu_devices("h200x8")
  for devices, card in ((h100, "h100"), (h200, "h200")):
    name, usable = topology.device_memory(None, devices)
    assert name == card
    spec_bytes = int(topology.gpu_target_config(card).split("device_memory_size:")[1].split()[0])
    assert usable == pytest.approx(spec_bytes / 2**30 * topology.GPU_MEM_FRACTION, rel=0.01)


def test_simulation_is_labelled():
  class Args:
    topology = None
  assert "XLA:CPU simulation" in compiling.compiler_label(Args(), make_mesh("expert=8", num_experts=8))


def _a2a_text(devices, dtype):
  mesh = Mesh(np.array(devices[:4]), ("x",))
  x = jax.ShapeDtypeStruct((4 * 8, 16, 32), dtype, sharding=NamedSharding(mesh, P("x")))
  f = jax.shard_map(lambda a: jax.lax.all_to_all(a, "x", 0, 0, tiled=True), mesh=mesh, in_specs=P("x"),
                    out_specs=P("x"))
  return jax.jit(f).lower(x).compile().as_text()


def test_async_all_to_all_is_counted_once(h100):
  """XLA:GPU's all-to-all is an async pair whose -start type holds the input and output buffers: it is
  counted once, equal to XLA:CPU's synchronous all-to-all of the same program and to the closed form."""
  gpu, cpu = _a2a_text(h100, jnp.float32), _a2a_text(jax.devices(), jnp.float32)
  assert "all-to-all-start" in gpu and "all-to-all-start" not in cpu
  g, c = hlo_stats(gpu), hlo_stats(cpu)
  assert g["all_to_all_ops"] == c["all_to_all_ops"] == 1
  assert g["all_to_all_bytes"] == c["all_to_all_bytes"] == 8 * 16 * 32 * 4  # one [8, 16, 32] f32 shard
  assert hlo_stats(_a2a_text(h100, jnp.bfloat16))["all_to_all_bytes"] == 8 * 16 * 32 * 2


@pytest.mark.slow
def test_train_step_capacity_on_h100x8(h100):
  """Expert parallelism with capacity: async all-to-alls whose bytes equal the analytic exchange."""
  cfg = CFG.replace(capacity_factor=1.25)
  mesh = make_mesh("data=2,expert=4", devices=h100, num_experts=8)
  text = _train_text(cfg, mesh)
  stats = hlo_stats(text)
  assert "all-to-all-start" in text and "all-to-all-done" in text
  # There and back per layer, in the forward, the remat forward and the backward.
  assert stats["all_to_all_ops"] == 2 * 3 * cfg.num_hidden_layers
  assert stats["all_to_all_bytes"] == analytic(cfg, mesh, BATCH, SEQ, 1)["all_to_all_bytes"]


@pytest.mark.slow
def test_every_remat_policy_compiles_for_gpu(h100):
  """Each remat policy's train step compiles with XLA:GPU (expert parallelism with capacity); the
  offloading ones pass the pinned-host check on the H100 topology's devices and put their kept
  activations in host memory (XLA's memory space S(5) in the compiled layouts), which no other policy
  does."""
  from mixtral_jax.model import OFFLOADING, REMAT_POLICIES, remat_policy  # noqa: PLC0415
  mesh = make_mesh("data=2,expert=4", devices=h100, num_experts=8)
  host = {}
  for remat in REMAT_POLICIES:
    remat_policy(remat, h100)
    host[remat] = "S(5)" in _train_text(CFG.replace(capacity_factor=1.25, remat=remat), mesh)
  assert host == {name: name in OFFLOADING for name in REMAT_POLICIES}, host


@pytest.mark.slow
def test_train_step_dropless_uses_fused_kernels(h100):
  """Dropless expert parallelism on 8 H100s (attention "auto", packed rows): ragged all-to-all, a fused
  attention kernel, a grouped-GEMM kernel, and no dense dot over every expert (the expansion of
  lax.ragged_dot on XLA:GPU). Fails until issue 18's GPU kernels are merged (today: the dense dots)."""
  cfg = CFG.replace(capacity_factor=None, moe_impl="auto", attention_impl="auto")
  mesh = make_mesh("data=2,expert=4", devices=h100, num_experts=8)
  text = _train_text(cfg, mesh)
  stats = hlo_stats(text)
  assert stats["ragged_all_to_all_ops"] >= 4 * cfg.num_hidden_layers
  assert "ragged-all-to-all-start" in text or "ragged-all-to-all" in text
  # A grouped matmul expanded to a dense one contracts groups x features: the local experts' (2) or all 8.
  expanded = {g * n for g in (cfg.num_local_experts // 4, cfg.num_local_experts)
              for n in (cfg.hidden_size, cfg.intermediate_size, 2 * cfg.intermediate_size)}
  assert not expanded & set(stats["dot_contracted_sizes"]), stats["dot_contracted_sizes"]
  # Nor a dot that XLA made of a ragged_dot: on XLA:GPU that is a batched dot of every group over every
  # row, then a sum over the groups (f32[groups, rows, F] here); a grouped GEMM is a kernel, not a dot.
  dense = [line for line in text.splitlines() if " dot(" in line and "ragged_dot" in line]
  assert not dense, dense[0][:300]
  targets = _targets(text)
  assert any(t.startswith(GROUPED_GEMM) for t in targets), targets
  assert any(t.startswith(FUSED_ATTENTION) for t in targets), targets


@pytest.mark.slow
def test_prefill_and_decode_on_h100x8(h100):
  """generate's prefill and decode programs compile for 8 H100s (expert=8): async all-to-alls for the
  experts, figures for both programs."""
  mesh = make_mesh("expert=8", devices=h100, num_experts=8)
  out = plan_serving(CFG, mesh, batch=8, context=64)
  for name in ("prefill", "decode"):
    f = out[name]
    assert f["peak_bytes"] > out["param_bytes"] and f["flops"] > 0
    assert f["all_to_all_ops"] + f["ragged_all_to_all_ops"] >= 2 * CFG.num_hidden_layers, f


@pytest.mark.slow
def test_one_gpu_generate_compiles():
  """A one-device serving plan compiles deviceless (issue 18 saw cudaErrorInvalidDevice there)."""
  devices = topology.gpu_devices("h100x1")
  mesh = make_mesh("expert=1", devices=devices, num_experts=8)
  for weights in ("bf16", "int8"):
    out = plan_serving(CFG, mesh, batch=2, context=64, weights=weights)
    assert out["prefill"]["peak_bytes"] > out["param_bytes"] > 0
