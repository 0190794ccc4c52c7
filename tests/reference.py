"""Independent references for tests: random tiny transformers Mixtral models, saved in the formats a
user meets (single or sharded safetensors, fp32 or bf16)."""

from __future__ import annotations

import os

import numpy as np

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
            sliding_window=None, rope_theta=1e6, rms_norm_eps=1e-5)

# Configs that exercise each architectural option (GQA ratios, head_dim override, sliding window,
# 4 and 8 experts, top-1 and top-2).
VARIANTS = {
    "gqa2": {},
    "mha": {"num_key_value_heads": 4},
    "mqa": {"num_key_value_heads": 1},
    "head_dim32": {"head_dim": 32},
    "window7": {"sliding_window": 7},
    "e4_top1": {"num_local_experts": 4, "num_experts_per_tok": 1},
}


FP32 = {"param_dtype": "float32", "dtype": "float32"}


def sharp_model(seed: int, **overrides):
  """A random ``mixtral_jax.Mixtral`` of ``TINY`` with ``overrides``, its router weights scaled by 20
  (as :func:`hf_model`'s) so that top-k choices have clear margins and rounding cannot flip one."""
  from flax import nnx  # noqa: PLC0415

  import mixtral_jax as mj  # noqa: PLC0415
  model = mj.Mixtral(mj.MixtralConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))
  model.blocks.moe.router_DE[...] = model.blocks.moe.router_DE[...] * 20
  return model


def hf_model(seed: int = 0, router_scale: float = 20.0, **overrides):
  """A random ``MixtralForCausalLM`` in eval mode. Router weights are scaled up so that top-k choices
  have clear margins and tiny float differences cannot flip an expert choice."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.MixtralConfig(**{**TINY, **overrides})
  model = transformers.MixtralForCausalLM(cfg).eval()
  with torch.no_grad():
    for layer in model.model.layers:
      layer.mlp.gate.weight.mul_(router_scale)
  return model


def save_hf(model, path: str | os.PathLike, *, shard_size: str | None = None, dtype: str = "float32") -> str:
  """``save_pretrained`` as a user would get it from the Hub: per-expert key names, safetensors."""
  import torch

  if dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  kwargs = {"max_shard_size": shard_size} if shard_size else {}
  model.save_pretrained(str(path), safe_serialization=True, **kwargs)
  return str(path)


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None):
  """(logits float32 [B,T,V], router logits [L, B*T, E]) from transformers."""
  import torch

  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
                output_router_logits=True)
  return out.logits.float().numpy(), np.stack([r.float().numpy() for r in out.router_logits])


def save_hf_with_tokenizer(model, path: str | os.PathLike) -> str:
  """``save_hf`` plus the Mistral v1 tokenizer beside the weights, as sentencepiece ``tokenizer.model``
  (what mixtral-jax reads) and as an HF tokenizer (what lm-eval's ``hf`` model reads). The HF one is
  built by ``AutoTokenizer`` from a folder holding only ``tokenizer.model``, which equals sentencepiece
  (the model's vocabulary must be 32000)."""
  import shutil
  import tempfile

  from transformers import AutoTokenizer

  from mixtral_jax.tokenizer import bundled_path

  path = save_hf(model, path)
  with tempfile.TemporaryDirectory() as only:
    shutil.copy(bundled_path("v1"), os.path.join(only, "tokenizer.model"))
    AutoTokenizer.from_pretrained(only, add_bos_token=True).save_pretrained(path)
  shutil.copy(bundled_path("v1"), os.path.join(path, "tokenizer.model"))
  return path
