"""bitsandbytes nf4 checkpoints (both transformers layouts) read into our nf4 layout, checked against
bitsandbytes' own dequantization of the same file, bit for bit."""

import functools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import quant_nf4
from mixtral_jax.checkpoint import bnb4_params, hf
from mixtral_jax.checkpoint.bnb4 import Bnb4Source
from mixtral_jax.checkpoint.loading import our_shapes
from mixtral_jax.config import MixtralConfig
import reference

pytestmark = pytest.mark.slow  # transformers references / several compiles

import torch
import bitsandbytes.functional as bnbf
import transformers
import safetensors.torch as safetensors_torch

SMALL = dict(num_hidden_layers=2, num_local_experts=4, vocab_size=256, head_dim=64)  # nf4 packs o along H: H % 64 == 0
QUANT_CONFIG = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8"}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
  return reference.save_hf(reference.hf_model(**SMALL), tmp_path_factory.mktemp("float"), dtype="bfloat16")


@pytest.fixture(scope="module")
def t5_dir(float_dir, tmp_path_factory):
  """transformers 5 + bitsandbytes on CPU: attention nf4 (double-quantized scales), experts float."""
  cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
  model = transformers.MixtralForCausalLM.from_pretrained(float_dir, quantization_config=cfg, device_map="cpu")
  out = tmp_path_factory.mktemp("t5")
  model.save_pretrained(out)
  return str(out)


def _quantized_linear_names(names):
  """What transformers 4 quantized: every nn.Linear in the decoder (attention, experts, router)."""
  return [n for n in names if n.endswith(".weight") and ("self_attn." in n or "block_sparse_moe." in n)]


def write_t4(float_dir, out, *, quant_type="nf4", drop=None, int8=None):
  """The transformers-4 layout made by hand: quantize_4bit + QuantState.as_dict(packed=True); attention
  with float32 scales, experts and router with double-quantized scales."""
  tensors = safetensors_torch.load_file(os.path.join(float_dir, "model.safetensors"))
  out_tensors = {}
  for name, w in tensors.items():
    if name not in _quantized_linear_names(tensors):
      out_tensors[name] = w
      continue
    codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                      compress_statistics="self_attn." not in name)
    out_tensors[name] = codes
    for k, v in state.as_dict(packed=True).items():
      out_tensors[f"{name}.{k}"] = v
  if drop:
    del out_tensors[drop]
  if int8:
    out_tensors[int8] = torch.zeros(tensors[int8].shape, dtype=torch.int8)
    out_tensors[int8 + ".SCB"] = torch.ones(tensors[int8].shape[0])
  os.makedirs(out, exist_ok=True)
  safetensors_torch.save_file(out_tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(float_dir, "config.json")) as f:
    config = json.load(f)
  config["quantization_config"] = dict(QUANT_CONFIG, bnb_4bit_quant_type=quant_type)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f)
  return str(out)


@pytest.fixture(scope="module")
def t4_dir(float_dir, tmp_path_factory):
  return write_t4(float_dir, tmp_path_factory.mktemp("t4"))


@functools.lru_cache(maxsize=4)
def _file(directory):
  return safetensors_torch.load_file(os.path.join(directory, "model.safetensors"))


def _bnb_dequant(directory, name):
  """bitsandbytes' own reading of one weight: QuantState.from_dict + dequantize_4bit."""
  tensors = _file(directory)
  qs = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
  state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
  return bnbf.dequantize_4bit(tensors[name], state)


def _bits(t):
  a = t.float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
  return a.view(np.uint32)


@pytest.mark.parametrize("layout", ["t4", "t5"])
def test_every_quantized_tensor_dequantizes_like_bitsandbytes(layout, t4_dir, t5_dir):
  directory = t4_dir if layout == "t4" else t5_dir
  source = Bnb4Source(hf.open_source(directory))
  quantized = [n for n in source.names() if source.is_quantized(n)]
  assert len(quantized) == (2 * (4 + 4 * 3 + 1) if layout == "t4" else 2 * 4)
  for name in quantized:
    t = source.read_nf4(name)
    ours = quant_nf4.dequantize(jnp.asarray(t.codes), jnp.asarray(t.absmax), jnp.bfloat16)
    ref = _bnb_dequant(directory, name)
    np.testing.assert_array_equal(_bits(ours), _bits(ref), err_msg=name)
    np.testing.assert_array_equal(_bits(source.read(name)), _bits(ref), err_msg=name)
    assert source.shape(name) == tuple(ref.shape)


@pytest.mark.parametrize("layout", ["t4", "t5"])
def test_read_params_gives_our_layout(layout, t4_dir, t5_dir, float_dir):
  """Dequantized and put back in our orientation, each site equals bitsandbytes' dequantization of the
  Hugging Face tensor mapped by the documented HF -> ours rules; float experts (t5) get bnb's codes."""
  directory = t4_dir if layout == "t4" else t5_dir
  cfg = MixtralConfig.load(os.path.join(directory, "config.json"))
  shapes, _ = our_shapes(cfg)
  params = bnb4_params.read_params(directory, cfg, shapes)
  D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size

  def ours(key, *idx):
    t = params[key]
    w = quant_nf4.dequantize(jnp.asarray(t.codes[idx]), jnp.asarray(t.absmax[idx]), jnp.bfloat16)
    assert w.shape == shapes[key][len(idx):]
    return w

  for l in range(cfg.num_hidden_layers):
    p = f"model.layers.{l}."
    q_ref = _bnb_dequant(directory, p + "self_attn.q_proj.weight").reshape(N, H, D).permute(2, 0, 1)
    np.testing.assert_array_equal(_bits(ours(("blocks", "attn", "q_DNH"), l)), _bits(q_ref))
    o_ref = _bnb_dequant(directory, p + "self_attn.o_proj.weight").reshape(D, N, H).permute(1, 2, 0)
    np.testing.assert_array_equal(_bits(ours(("blocks", "attn", "o_NHD"), l)), _bits(o_ref))
    v_ref = _bnb_dequant(directory, p + "self_attn.v_proj.weight").reshape(K, H, D).permute(2, 0, 1)
    np.testing.assert_array_equal(_bits(ours(("blocks", "attn", "v_DKH"), l)), _bits(v_ref))
    for e in range(cfg.num_local_experts):
      name = p + f"block_sparse_moe.experts.{e}.w2.weight"
      if layout == "t4":
        w2_ref = _bnb_dequant(directory, name).T
      else:  # float in the file: quantized on reading, with bitsandbytes' codes
        w = safetensors_torch.load_file(os.path.join(float_dir, "model.safetensors"))[name]
        codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        w2_ref = bnbf.dequantize_4bit(codes, state).T
      np.testing.assert_array_equal(_bits(ours(("blocks", "moe", "w2_EFD"), l, e)), _bits(w2_ref))
    router = params[("blocks", "moe", "router_DE")][l]
    if layout == "t4":
      np.testing.assert_array_equal(_bits(router), _bits(_bnb_dequant(directory, p + "block_sparse_moe.gate.weight").T))
  assert params[("embed_VD",)].shape == (cfg.vocab_size, D)
  assert params[("blocks", "moe", "w1_EDF")].codes.shape == (2, 4, D // 2, cfg.intermediate_size)


def test_nested_scales_expand_exactly(t4_dir):
  source = Bnb4Source(hf.open_source(t4_dir))
  name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
  assert source.states[name].get("nested")
  tensors = safetensors_torch.load_file(os.path.join(t4_dir, "model.safetensors"))
  qs = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
  state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
  ref = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
  np.testing.assert_array_equal(source.read_nf4(name).absmax.reshape(-1).view(np.uint32),
                                ref.numpy().view(np.uint32))


def test_fp4_is_refused_naming_file_and_tensor(float_dir, tmp_path):
  d = write_t4(float_dir, tmp_path / "fp4", quant_type="fp4")
  with pytest.raises(ValueError, match=r"quantization_config has bnb_4bit_quant_type='fp4'"):
    bnb4_params.open_bnb4(d)
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\..*' is bitsandbytes fp4"):
    Bnb4Source(hf.open_source(d))


def test_missing_quant_state_is_refused(float_dir, tmp_path):
  name = "model.layers.1.self_attn.k_proj.weight"
  d = write_t4(float_dir, tmp_path / "nostate", drop=name + ".quant_state.bitsandbytes__nf4")
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' .*quant state"):
    bnb4_params.open_bnb4(d)
  d = write_t4(float_dir, tmp_path / "noabsmax", drop=name + ".absmax")
  with pytest.raises(ValueError, match=rf"tensor '{name}' lacks {name}\.absmax"):
    bnb4_params.open_bnb4(d)


def test_8bit_is_refused(float_dir, tmp_path):
  d = write_t4(float_dir, tmp_path / "int8", int8="model.layers.0.block_sparse_moe.gate.weight")
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.block_sparse_moe\.gate"
                                       r"\.weight\.SCB' belongs to a bitsandbytes 8-bit"):
    bnb4_params.open_bnb4(d)
  with open(os.path.join(d, "config.json")) as f:
    config = json.load(f)
  config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"config\.json: quantization_config is bitsandbytes 8-bit"):
    bnb4_params.open_bnb4(d)


def test_a_float_checkpoint_is_not_taken_for_bnb(float_dir):
  with pytest.raises(ValueError, match="has no bitsandbytes quantization_config"):
    bnb4_params.open_bnb4(float_dir)
