"""``mixtral-jax plan --lora R --dpo`` compiles the DPO step: on the same rows it costs the SFT LoRA step's
FLOPs plus one reference forward (adapters off, no backward), which the analytic count predicts.

Independent reference: the SFT LoRA plan of the same program on the same ``2 x pairs`` rows. One device
(``data=1``) so the expert capacity of the analytic count is the compiled one's, and ``--moe-impl dense``
(the bucketed ``[E, C, D]`` experts, the GPU/TPU training path's shape; XLA:CPU's ``blocked`` kernel computes
more expert rows than the analytic count models, in SFT and DPO alike)."""

import argparse
import json

import jax
import pytest

import mixtral_jax
from mixtral_jax.sharding.mesh import make_mesh
from mixtral_jax.train.plan import training as plan_training
from mixtral_jax.train.plan.commands import plan_main, plan_parser
from mixtral_jax.train.plan.compiling import model_config

pytestmark = pytest.mark.slow  # six compiles of a tiny train step

PAIRS, T = 2, 32
# The two programs share the policy forward and backward on the same rows, so their difference is the
# reference forward's dots alone, which the analytic count lists one by one (projections, scores, router,
# E*C expert rows, LM head, adapters); measured here 0.99. A reference forward missing, run twice, or
# differentiated would put the ratio near 0, 2 or >= 3: 5% separates those with a wide margin.
TOL = 0.05


def _args(*extra):
  p = argparse.ArgumentParser()
  plan_parser(p)
  return p.parse_args(["--preset", "tiny", "--mesh", "data=1", "--moe-impl", "dense", "--seq", str(T),
                        *extra])


def _reference_forward_ratio(sft: dict, dpo: dict) -> float:
  """(DPO compiled FLOPs - SFT compiled FLOPs on the same rows) / the analytic reference forward."""
  return (dpo["compiled"]["flops"] - sft["compiled"]["flops"]) / dpo["analytic"]["reference_forward_flops"]


def test_cli_dpo_plan_is_sft_plus_the_reference_forward(tmp_path, capsys):
  out_json = tmp_path / "dpo.json"
  args = _args("--batch", str(PAIRS), "--lora", "4", "--dpo", "--json", str(out_json))
  assert plan_main(args) == 0
  printed = capsys.readouterr().out
  assert f"DPO, batch {PAIRS} pairs ({2 * PAIRS} rows) x {T}" in printed
  assert "DPO reference forward (adapters off, no backward)" in printed and "peak (arguments" in printed
  dpo = json.loads(out_json.read_text())
  assert dpo["dpo"] is True and dpo["compiled"]["peak_bytes"] > 0

  cfg = model_config(args)
  mesh = make_mesh("data=1", devices=jax.devices()[:1], num_experts=cfg.num_local_experts)
  sft = plan_training.plan(cfg, mesh, batch=2 * PAIRS, seq=T, lora_rank=4)  # the same rows, scored once
  assert abs(_reference_forward_ratio(sft, dpo) - 1) < TOL
  # peak reported, and the reference forward adds at most one float32 [2 x pairs, T, V] of LM-head logits
  # (its head runs while the policy's are held; measured: half that, bf16) and keeps nothing for the backward
  sft_peak, logits = sft["compiled"]["peak_bytes"], 2 * PAIRS * T * cfg.vocab_size * 4
  assert sft_peak <= dpo["compiled"]["peak_bytes"] <= sft_peak + logits


@pytest.mark.parametrize("base", [None, "nf4"])
def test_dpo_plan_saves_what_sft_saves(base):
  cfg = mixtral_jax.get_config("tiny", vocab_size=512, head_dim=64, dtype="float32", remat="full",
                               capacity_factor=1.25, moe_impl="dense")
  mesh = make_mesh("data=1", devices=jax.devices()[:1], num_experts=cfg.num_local_experts)
  sft = plan_training.plan(cfg, mesh, batch=2 * PAIRS, seq=T, lora_rank=4, base_quantize=base)
  dpo = plan_training.plan(cfg, mesh, batch=PAIRS, seq=T, lora_rank=4, base_quantize=base, dpo=True)
  # the per-expert dequantization recomputes the policy's expert products in the backward (more compiled
  # FLOPs than the analytic step), but the reference forward has no backward: the difference is still one forward
  assert abs(_reference_forward_ratio(sft, dpo) - 1) < TOL
  assert dpo["compiled"]["base_bytes"] == sft["compiled"]["base_bytes"]  # one base, no second model
  # The reference forward runs outside the differentiated function, so the policy's layer scan saves what
  # SFT's saves. (With it inside, the scan kept a copy of the stacked base weights for the backward: +56%
  # temporaries on this tiny float-base model (the nf4 one hides it), +21.9 GiB for 8x7B nf4, 4 pairs x 4096, on one H100.)
  assert dpo["compiled"]["temp_bytes"] <= 1.02 * sft["compiled"]["temp_bytes"]
  assert dpo["analytic"]["tokens_per_device"] == 2 * PAIRS * T


def test_dpo_without_lora_is_one_line():
  with pytest.raises(ValueError, match=r"^--dpo plans the DPO training step.*add --lora RANK") as e:
    plan_main(_args("--batch", str(PAIRS), "--dpo"))
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="not serving: drop --generate"):
    plan_main(_args("--batch", str(PAIRS), "--dpo", "--lora", "4", "--generate"))
  with pytest.raises(ValueError, match=r"^--dpo compiles the DPO step.*add --lora RANK"):
    plan_training.plan(mixtral_jax.get_config("tiny"), None, batch=PAIRS, seq=T, dpo=True)


def test_mfu_counts_the_reference_forward():
  """Training's MFU numerator: per row token, DPO adds 2 FLOPs per frozen matmul parameter (the parameter
  count from ``param_counts``, independent of the formula) and the scores' forward, 2 * L * N * H * T."""
  from mixtral_jax.train import metrics  # noqa: PLC0415
  from mixtral_jax.train.config import TrainConfig  # noqa: PLC0415

  cfg = mixtral_jax.get_config("tiny")
  lora = TrainConfig().override({"lora.rank": 4}).lora
  _, active = mixtral_jax.param_counts(cfg)
  frozen = active - cfg.vocab_size * cfg.hidden_size
  scores = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_size * T
  diff = metrics.train_flops_per_token(cfg, T, lora, dpo=True) - metrics.train_flops_per_token(cfg, T, lora)
  assert diff == pytest.approx(2 * frozen + scores, rel=1e-12)
  with pytest.raises(ValueError, match="set lora.rank"):
    metrics.train_flops_per_token(cfg, T, None, dpo=True)
