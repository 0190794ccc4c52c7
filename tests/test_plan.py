"""``mixtral-jax plan`` compiles the real train step of both full presets on 64 simulated CPU devices, from
shapes alone, and its per-device figures match closed-form expectations."""

import json
import os
import subprocess
import sys

import pytest

from mixtral_jax.config import get_config
from mixtral_jax.params import param_counts
from mixtral_jax.train.plan import hlo_stats


def _run_plan(tmp_path, preset, mesh):
  out = tmp_path / f"{preset}.json"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=64", "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "mixtral_jax.cli", "plan", "--preset", preset, "--mesh", mesh, "--batch", "64",
         "--seq", "128", "--json", str(out)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "parameters (GiB)" in proc.stdout
  return json.loads(out.read_text())


@pytest.mark.parametrize("preset,mesh,fsdp,expert", [
    ("mixtral-8x7b", "data=2,fsdp=4,expert=8", 4, 8),
    ("mixtral-8x22b", "fsdp=8,expert=8", 8, 8),
])
def test_plan_full_presets_on_64_devices(tmp_path, preset, mesh, fsdp, expert):
  result = _run_plan(tmp_path, preset, mesh)
  c, a = result["compiled"], result["analytic"]
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
