"""MixtralConfig: Hugging Face config.json round trips, both rope forms, presets, validation."""

import json

import pytest

import mixtral_jax
from mixtral_jax.config import MixtralConfig


def test_transformers_reads_our_config_json(tmp_path):
  import transformers

  cfg = mixtral_jax.get_config("tiny", head_dim=48, sliding_window=64, router_aux_loss_coef=0.001)
  cfg.save(tmp_path / "config.json")
  hf = transformers.MixtralConfig.from_pretrained(tmp_path)
  assert hf.hidden_size == cfg.hidden_size and hf.head_dim == 48 and hf.sliding_window == 64
  assert hf.num_local_experts == cfg.num_local_experts and hf.num_experts_per_tok == cfg.num_experts_per_tok
  assert hf.router_aux_loss_coef == pytest.approx(0.001)
  assert hf.rope_parameters["rope_theta"] == pytest.approx(cfg.rope_theta)


def test_reads_transformers_config_json_new_rope_parameters(tmp_path):
  import transformers

  hf = transformers.MixtralConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                                  rope_theta=12345.0, sliding_window=17, num_local_experts=4,
                                  num_experts_per_tok=1, router_aux_loss_coef=0.05)
  hf.save_pretrained(tmp_path)
  raw = json.loads((tmp_path / "config.json").read_text())
  assert "rope_parameters" in raw  # transformers 5 writes the new form
  cfg = MixtralConfig.load(tmp_path / "config.json")
  assert (cfg.rope_theta, cfg.head_size, cfg.sliding_window) == (12345.0, 32, 17)
  assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.router_aux_loss_coef) == (4, 1, 0.05)


def test_reads_old_rope_theta_form():
  d = {"model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
       "rope_theta": 5e5, "sliding_window": None}
  cfg = MixtralConfig.from_hf_dict(d)
  assert cfg.rope_theta == 5e5 and cfg.sliding_window is None and cfg.head_size == 16


def test_round_trip_is_identity(tmp_path):
  for name in mixtral_jax.PRESETS:
    cfg = mixtral_jax.get_config(name)
    cfg.save(tmp_path / "c.json")
    assert MixtralConfig.load(tmp_path / "c.json") == cfg


def test_presets_match_the_design_table():
  c7, c22, c22i = (mixtral_jax.get_config(n) for n in ("mixtral-8x7b", "mixtral-8x22b", "mixtral-8x22b-instruct"))
  assert (c7.hidden_size, c7.num_hidden_layers, c7.intermediate_size, c7.router_aux_loss_coef) == (4096, 32, 14336, 0.02)
  assert (c22.hidden_size, c22.num_hidden_layers, c22.vocab_size, c22.router_aux_loss_coef) == (6144, 56, 32000, 0.001)
  assert c22i.vocab_size == 32768 and c22i.num_attention_heads == 48


@pytest.mark.parametrize("bad, words", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(capacity_factor=0.0), "capacity_factor"),
])
def test_invalid_configs_name_the_problem(bad, words):
  with pytest.raises(ValueError, match=words):
    mixtral_jax.get_config("tiny", **bad)


def test_unknown_preset_lists_choices():
  with pytest.raises(ValueError, match="mixtral-8x7b"):
    mixtral_jax.get_config("mixtral-9x9b")


def test_wrong_model_type_is_refused():
  with pytest.raises(ValueError, match="model_type"):
    MixtralConfig.from_hf_dict({"model_type": "llama"})
