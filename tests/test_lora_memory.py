"""The analytic LoRA/QLoRA memory count: its weight terms against the exact parameter counts."""

import pytest

from mixtral_jax.config import get_config
from mixtral_jax.lora import LoraSection
from mixtral_jax.train import lora_memory

TOTAL_8X7B = 46_702_792_704  # DESIGN.md, checked by tests/test_param_counts.py with jax.eval_shape


def test_unquantized_base_is_every_parameter_in_bf16():
  cfg = get_config("mixtral-8x7b")
  assert lora_memory.estimate(cfg, LoraSection(rank=16), 4, 4096, "none").base == 2 * TOTAL_8X7B


def test_nf4_and_int8_bases_count_their_stored_forms():
  cfg = get_config("mixtral-8x7b")
  L, D, F, E, V = 32, 4096, 14336, 8, 32000
  sites = L * (2 * D * 4096 + 2 * D * 1024 + 3 * E * D * F)  # q, o, k, v, and every expert's w1, w3, w2
  rest = TOTAL_8X7B - sites
  nf4 = lora_memory.estimate(cfg, LoraSection(rank=16), 4, 4096, "nf4").base
  assert nf4 == sites // 2 + 4 * (sites // 64) + 2 * rest
  int8 = lora_memory.estimate(cfg, LoraSection(rank=16), 4, 4096, "int8").base
  out_channels = L * (4096 + 1024 + 1024 + D + 2 * E * F + E * D)  # one float32 scale per output channel
  assert int8 == sites + 4 * out_channels + 2 * rest
  assert rest == 2 * V * D + L * (D * E + 2 * D) + D


def test_adapters_cost_sixteen_bytes_per_parameter_and_bad_mode_is_named():
  cfg = get_config("tiny", head_dim=64)  # nf4 packs o_NHD along H: a multiple of 64
  lora = LoraSection(rank=4, targets=("q",))
  assert lora_memory.estimate(cfg, lora, 1, 16, "nf4").adapters == 16 * (128 + 4 * 64) * 4 * 2  # (D + NH) r, L = 2
  with pytest.raises(ValueError, match="lora.base_quantize='nf8' is not one of none, int8, nf4"):
    lora_memory.estimate(cfg, lora, 1, 16, "nf8")
