"""Exact parameter counts of the full presets, from the abstract module (nothing allocated)."""

import pytest

import mixtral_jax


@pytest.mark.parametrize("name, total, active", [
    ("mixtral-8x7b", 46_702_792_704, 12_879_925_248),
    ("mixtral-8x22b", 140_620_634_112, 39_152_031_744),
])
def test_full_preset_counts(name, total, active):
  assert mixtral_jax.param_counts(mixtral_jax.get_config(name)) == (total, active)


def test_tiny_counts_match_transformers():
  import transformers

  cfg = mixtral_jax.get_config("tiny")
  hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg.to_hf_dict()))
  total = sum(p.numel() for p in hf.parameters())
  assert mixtral_jax.param_counts(cfg)[0] == total
