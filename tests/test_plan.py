"""``mixtral-jax plan`` compiles the real train step of both full presets on 64 simulated CPU devices, from
shapes alone, and its per-device figures match closed-form expectations."""

import json
import os
import subprocess
import sys

import pytest

from mixtral_jax.config import get_config
from mixtral_jax.params import param_counts
from mixtral_jax.train.plan.hlo_stats import hlo_stats
from mixtral_jax.train.plan.topology import DEVICE_MEMORY


def _run_plan(tmp_path, preset, mesh, *extra):
  """The CLI in a fresh process on a CPU-only host, without --simulate and without the test suite's 8
  simulated devices: plan must simulate the mesh's 64 devices by itself."""
  out = tmp_path / f"{preset}.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  cmd = [sys.executable, "-m", "mixtral_jax.cli", "plan", "--preset", preset, "--mesh", mesh, "--batch", "64",
         "--seq", "128", "--json", str(out), *extra]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "parameters (GiB)" in proc.stdout
  return json.loads(out.read_text()), proc.stdout


@pytest.mark.subprocess_cli
@pytest.mark.parametrize("preset,mesh,fsdp,expert,device", [
    ("mixtral-8x7b", "data=2,fsdp=4,expert=8", 4, 8, "v5e"),
    ("mixtral-8x22b", "fsdp=8,expert=8", 8, 8, "h100"),
])
def test_plan_full_presets_on_64_devices(tmp_path, preset, mesh, fsdp, expert, device):
  result, stdout = _run_plan(tmp_path, preset, mesh, "--device", device)
  assert "(64 x cpu: XLA:CPU simulation" in stdout  # simulated by itself, and labelled so
  c, a = result["compiled"], result["analytic"]
  # The peak from the compiler's own memory analysis, and the verdict against the device's memory.
  assert c["peak_bytes"] == c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
  usable = DEVICE_MEMORY[device] * 2**30
  assert result["device"] == {"name": device, "usable_bytes": pytest.approx(usable), "fits": c["peak_bytes"] <= usable}
  verdict = "  fits: peak" if c["peak_bytes"] <= usable else "  does not fit: needs"
  assert verdict in stdout
  if c["peak_bytes"] > usable:
    assert "more fsdp" in stdout and "LoRA" in stdout
  cfg = get_config(preset)
  L, D, F, E = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
  total, _ = param_counts(cfg)
  experts = L * 3 * E * D * F  # split over expert x fsdp
  rest = total - experts  # attention, router, norms, embedding and head: also split over expert x fsdp (ZeRO)
  expected = 4 * (experts + rest) / (expert * fsdp)  # fp32 master weights
  assert c["param_bytes"] == pytest.approx(expected, rel=1e-12)
  assert c["param_bytes"] == pytest.approx(a["param_bytes"], rel=1e-12)
  assert abs(c["opt_bytes"] - 2 * c["param_bytes"]) < 4096  # AdamW mu and nu, plus step counters
  assert c["flops"] == pytest.approx(a["flops"], rel=0.05)  # HLO dots x trip counts vs 4 x forward
  assert c["unknown_trip_loops"] == 0
  # 2 exchanges forward, 2 in the remat forward, 2 transposes, per layer; bf16 carried as f32 on XLA:CPU.
  assert c["all_to_all_bytes"] == pytest.approx(2 * a["all_to_all_bytes"], rel=0.02)
  # Plus at most a few outside the layers, where GSPMD reshards an activation by all-to-all.
  assert 6 * L <= c["all_to_all_ops"] <= 6 * L + 4


def test_hlo_stats_weights_loop_bodies_by_trip_count():
  import jax
  import jax.numpy as jnp

  def f(w_LDD, x_BD):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_BD, w_LDD)[0].sum()

  hlo = jax.jit(jax.grad(f)).lower(jax.ShapeDtypeStruct((7, 32, 32), jnp.float32),
                                   jax.ShapeDtypeStruct((16, 32), jnp.float32)).compile().as_text()
  stats = hlo_stats(hlo)
  assert stats["flops"] == 7 * 3 * 2 * 16 * 32 * 32  # forward, and two matmuls in the backward, 7 times
  assert stats["all_to_all_bytes"] == 0 and stats["unknown_trip_loops"] == 0


def test_expert_mesh_holds_an_eighth_of_every_weight():
  """expert=8 on one host: dense weights (embedding, attention, router, norms, head) are split over
  the expert axis too (ZeRO), so no parameter is replicated."""
  import math

  import jax
  from flax import nnx

  from mixtral_jax.layers import LOGICAL_AXES
  from mixtral_jax.params import abstract_model
  from mixtral_jax.sharding import logical_sharding, make_mesh

  mesh = make_mesh("expert=8")
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(get_config("mixtral-8x7b")), nnx.Param)):
    shard = logical_sharding(var.get_metadata()[LOGICAL_AXES], mesh).shard_shape(var.shape)
    assert math.prod(shard) * 8 == math.prod(var.shape), (path, var.shape, shard)


@pytest.mark.subprocess_cli
def test_cli_error_without_enough_devices_names_simulate(tmp_path):
  """When JAX already runs (here: in a process that has started its 8 CPU devices) and the mesh needs
  more, the error says what to add."""
  import argparse

  import jax

  from mixtral_jax.train.plan.training import target_devices

  assert jax.device_count() == 8
  with pytest.raises(ValueError, match="add --simulate"):
    target_devices(argparse.Namespace(topology=None, simulate=False), 16)


@pytest.mark.slow
def test_plan_generate_kv_cache_and_peaks():
  """Serving plan on tensor=2,expert=4 (8 CPU devices): the KV cache and parameter shards equal the
  closed form, and both programs report their peak from the compiler's memory analysis."""
  from mixtral_jax.sharding import make_mesh
  from mixtral_jax.train.plan.serving import plan_serving

  cfg = get_config("tiny", num_hidden_layers=2, vocab_size=512)
  B, S = 4, 64
  out = plan_serving(cfg, make_mesh("tensor=2,expert=4"), batch=B, context=S)
  L, K, H = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size
  kv = 2 * L * B * S * K * H * 2 / (4 * 2)  # k and v, bf16, rows over expert=4, kv heads over tensor=2
  assert out["kv_cache_bytes"] == kv + B * S * 4 / 4  # plus the int32 slot positions, rows over expert
  total, _ = param_counts(cfg)
  assert out["param_bytes"] >= 2 * total / 8  # bf16; some small axes do not split 8 ways
  assert out["param_bytes"] <= 2 * total / 2
  for name in ("prefill", "decode"):
    f = out[name]
    assert f["peak_bytes"] == f["argument_bytes"] + f["output_bytes"] - f["alias_bytes"] + f["temp_bytes"]
    assert f["argument_bytes"] >= out["param_bytes"] + out["kv_cache_bytes"]
  assert out["prefill"]["flops"] > out["decode"]["flops"] > 0


@pytest.mark.slow
def test_blockwise_loops_counted_by_expected_trips():
  """Blockwise attention visits only the live key blocks, a loop whose trip count is data, which the HLO
  count sees once. Scaled by the causal average (closed form: (n + 1) / 2 of n blocks; with a one-block
  window, 2 - 1/n), the compiled FLOPs of a tiny train step agree with the analytic count within 5%,
  where counting each loop once is more than 10% short."""
  import jax

  from mixtral_jax.config import MixtralConfig
  from mixtral_jax.sharding.mesh import make_mesh
  from mixtral_jax.train.plan import plan
  from mixtral_jax.train.plan.training import live_key_blocks
  from reference import TINY

  assert live_key_blocks(256, 64, None) == (4 + 1) / 2
  assert live_key_blocks(256, 64, 64) == 2 - 1 / 4
  assert live_key_blocks(64, 64, None) == 1
  cfg = MixtralConfig(**{**TINY, "num_hidden_layers": 2, "vocab_size": 512}, dtype="bfloat16", remat="full",
                      attention_impl="blockwise", attention_block=64, capacity_factor=1.25)
  mesh = make_mesh("data=2,expert=4", devices=jax.devices(), num_experts=8)
  out = plan(cfg, mesh, batch=8, seq=256)
  c, a = out["compiled"], out["analytic"]
  assert c["unknown_trip_loops"] == 3 and c["unknown_trip_scale"] == 2.5  # forward, remat, backward
  assert c["flops"] == pytest.approx(a["flops"], rel=0.05)
  assert c["flops_loops_once"] < 0.9 * a["flops"]
