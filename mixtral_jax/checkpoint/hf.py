"""Hugging Face Mixtral directories: ``config.json`` plus ``model.safetensors`` or sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.

Two key layouts are read (torch ``Linear`` weights are ``[out, in]``; ours are ``[in, out]``). The names
are spelled once, in ``mixtral_jax.param_paths``; this table is their summary:

  ours                       Hub files (per expert)                         transformers >= 5 in memory (fused)
  embed_VD                   model.embed_tokens.weight [V, D]
  head_DV                    lm_head.weight [V, D] (transposed; the embedding when tied and absent)
  final_norm.scale           model.norm.weight
  blocks.attn_norm.scale[l]  model.layers.{l}.input_layernorm.weight
  blocks.moe_norm.scale[l]   model.layers.{l}.post_attention_layernorm.weight
  q_DNH[l]                   self_attn.q_proj.weight [N*H, D] -> [D, N, H] (half-split RoPE, as ours)
  k_DKH[l], v_DKH[l]         self_attn.k_proj/v_proj.weight [K*H, D]
  o_NHD[l]                   self_attn.o_proj.weight [D, N*H] -> [N, H, D]
  router_DE[l]               block_sparse_moe.gate.weight [E, D]            mlp.gate.weight
  w1_EDF[l, e]               block_sparse_moe.experts.{e}.w1.weight [F, D]  mlp.experts.gate_up_proj[:, :F] [E, 2F, D]
  w3_EDF[l, e]               block_sparse_moe.experts.{e}.w3.weight [F, D]  mlp.experts.gate_up_proj[:, F:]
  w2_EFD[l, e]               block_sparse_moe.experts.{e}.w2.weight [D, F]  mlp.experts.down_proj [E, D, F]
"""

from __future__ import annotations

import glob
import json
import os

from mixtral_jax import param_paths
from mixtral_jax.checkpoint.layout import Dims, Rule
from mixtral_jax.checkpoint.safetensors_io import SafetensorsSource
from mixtral_jax.config import MixtralConfig

INDEX = "model.safetensors.index.json"


def safetensors_files(directory: str) -> list[str]:
  """The weight files of a HF directory: those its index names (each must exist), else
  ``model*.safetensors``."""
  index_path = os.path.join(directory, INDEX)
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_path}: not a safetensors index ({e!r}); expected {{'weight_map': ...}}") from None
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if absent:
      raise FileNotFoundError(f"{index_path} names {len(absent)} file(s) that are not in {directory}: "
                              f"{', '.join(absent[:4])}; the download is incomplete")
    return [os.path.join(directory, f) for f in files]
  files = sorted(glob.glob(os.path.join(directory, "model*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{directory}: no model*.safetensors files")
  return files


def open_source(directory: str) -> SafetensorsSource:
  source = SafetensorsSource(safetensors_files(directory))
  index_path = os.path.join(directory, INDEX)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    have = set(source.names())
    lost = [n for n in weight_map if n not in have]
    if lost:
      raise ValueError(f"{index_path} lists tensor(s) that no file holds: {', '.join(lost[:4])} "
                       f"({len(lost)} in all); a shard is truncated or from another download")
  return source


def dims(cfg: MixtralConfig) -> Dims:
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
  return Dims(
      sizes={"V": (cfg.vocab_size, "vocab_size"), "D": (cfg.hidden_size, "hidden_size"),
             "F": (cfg.intermediate_size, "intermediate_size"),
             "2F": (2 * cfg.intermediate_size, "2*intermediate_size"),
             "E": (cfg.num_local_experts, "num_local_experts"),
             "NH": (N * H, "num_attention_heads*head_dim"), "KH": (K * H, "num_key_value_heads*head_dim")},
      config_file="config.json", layers=(cfg.num_hidden_layers, "num_hidden_layers"),
      experts=(cfg.num_local_experts, "num_local_experts"))


def is_fused(names) -> bool:
  return any(n.endswith("mlp.experts.gate_up_proj") for n in names)


def rules(cfg: MixtralConfig, names) -> list[Rule]:
  """The rules for the key layout found among ``names`` (fused if any fused expert tensor is there), one per
  row of ``mixtral_jax.param_paths``. A tied head without ``lm_head.weight`` reads the embedding."""
  fused = is_fused(names)
  out = []
  for w in param_paths.WEIGHTS:
    if fused and w.fused is not None:
      out.append(Rule(w.key, w.fused[0], param_paths.fused_torch_shape(w), param_paths.fused_to_ours(w, cfg), 1))
      continue
    name = w.hf
    if w.id == "lm_head" and cfg.tie_word_embeddings and name not in set(names):
      name = param_paths.weight("embed").hf
    out.append(Rule(w.key, name, w.torch, param_paths.torch_to_ours(w, cfg), w.unit))
  return out
