"""The nf4 model: from_pretrained(quantize="nf4") and bitsandbytes checkpoints, against transformers running
weights that bitsandbytes quantized and dequantized."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.inference import quantize as quantize_lib
import reference

pytestmark = pytest.mark.slow  # transformers references / several compiles

import torch
import bitsandbytes.functional as bnbf
import transformers

SMALL = dict(num_hidden_layers=2, num_local_experts=4, vocab_size=256, head_dim=64)  # nf4 packs o along H


def _bnb_round_trip(model):
  """transformers' model with attention and expert weights replaced by bnb's nf4 quantize + dequantize."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "self_attn." in name or ".experts." in name:
        flat = p.data.reshape(-1, p.shape[-1]) if p.ndim == 3 else p.data
        codes, state = bnbf.quantize_4bit(flat.contiguous(), blocksize=64, quant_type="nf4")
        p.data = bnbf.dequantize_4bit(codes, state).reshape(p.shape)
  return model


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
  return reference.save_hf(reference.hf_model(**SMALL), tmp_path_factory.mktemp("float32"))


def test_quantize_nf4_on_load_matches_transformers_on_bnb_weights(float_dir):
  """Experts in transformers 5 are fused [E, 2F, D] / [E, D, F]; bnb's blocks run along the last axis
  (D for gate_up, F for down), as ours do along the contracted axis, so the round trip is the same."""
  ids = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)
  model = mixtral_jax.from_pretrained(float_dir, quantize="nf4", dtype="float32")
  assert quantize_lib.is_quantized(model) and model.blocks.moe.w1_EDF[...].dtype == jnp.uint8
  assert model.head_DV[...].dtype == jnp.float32  # the LM head stays in float
  ours = np.asarray(model(jnp.asarray(ids)))
  ref_model = _bnb_round_trip(reference.hf_model(**SMALL))
  want, _ = reference.hf_logits(ref_model, ids)
  np.testing.assert_allclose(ours, want, atol=2e-4, rtol=0)
  plain = np.asarray(mixtral_jax.from_pretrained(float_dir, dtype="float32")(jnp.asarray(ids)))
  assert np.max(np.abs(plain - ours)) > 1e-3  # quantization did change the model


def test_a_bitsandbytes_checkpoint_loads_as_the_same_nf4_model(float_dir, tmp_path):
  """transformers 5 + bitsandbytes quantize attention (their codes) and leave experts float (we quantize
  them on reading): the same codes as quantize='nf4' on the float checkpoint, so the same logits."""
  cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                        bnb_4bit_compute_dtype=torch.float32)
  hf = transformers.MixtralForCausalLM.from_pretrained(float_dir, quantization_config=cfg, device_map="cpu")
  hf.save_pretrained(tmp_path / "bnb")
  ids = np.random.default_rng(1).integers(0, 256, (2, 10)).astype(np.int32)
  from_bnb = mixtral_jax.from_pretrained(str(tmp_path / "bnb"), dtype="float32")
  from_float = mixtral_jax.from_pretrained(float_dir, quantize="nf4", dtype="float32")
  for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(from_bnb, nnx.Param))),
                  jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(from_float, nnx.Param)))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.asarray(from_bnb(jnp.asarray(ids))), np.asarray(from_float(jnp.asarray(ids))))
  with pytest.raises(ValueError, match="bitsandbytes nf4 checkpoint: it loads as nf4"):
    mixtral_jax.from_pretrained(str(tmp_path / "bnb"), quantize="int8")


def test_nf4_refuses_a_head_dim_it_cannot_block(tmp_path):
  d = reference.save_hf(reference.hf_model(num_hidden_layers=1, num_local_experts=4, vocab_size=256), tmp_path / "h16")
  with pytest.raises(ValueError, match=r"packed along axis \d of size 16, not a multiple of the block size 64 "
                                       r"\(for o_NHD that axis is head_dim\)"):
    mixtral_jax.from_pretrained(d, quantize="nf4")
  assert os.path.isdir(d)
