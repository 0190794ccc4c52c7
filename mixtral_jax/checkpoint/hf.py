"""Hugging Face Mixtral directories: ``config.json`` plus ``model.safetensors`` or sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.

Two key layouts are read (torch ``Linear`` weights are ``[out, in]``; ours are ``[in, out]``):

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

from mixtral_jax.checkpoint.layout import Dims, Rule
from mixtral_jax.checkpoint.safetensors_io import SafetensorsSource
from mixtral_jax.config import MixtralConfig

INDEX = "model.safetensors.index.json"
_LAYER = "model.layers.{l}."


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
  """The rules for the key layout found among ``names`` (fused if any fused expert tensor is there)."""
  D, N, K, H, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size,
                   cfg.intermediate_size)
  head = "lm_head.weight"
  if cfg.tie_word_embeddings and head not in set(names):
    head = "model.embed_tokens.weight"
  common = [
      Rule(("embed_VD",), "model.embed_tokens.weight", ("V", "D"), lambda w: w, 0),
      Rule(("head_DV",), head, ("V", "D"), lambda w: w.T, 0),
      Rule(("final_norm", "scale"), "model.norm.weight", ("D",), lambda w: w, 0),
      Rule(("blocks", "attn_norm", "scale"), _LAYER + "input_layernorm.weight", ("D",), lambda w: w, 1),
      Rule(("blocks", "moe_norm", "scale"), _LAYER + "post_attention_layernorm.weight", ("D",), lambda w: w, 1),
      Rule(("blocks", "attn", "q_DNH"), _LAYER + "self_attn.q_proj.weight", ("NH", "D"),
           lambda w: w.reshape(N, H, D).transpose(2, 0, 1), 1),
      Rule(("blocks", "attn", "k_DKH"), _LAYER + "self_attn.k_proj.weight", ("KH", "D"),
           lambda w: w.reshape(K, H, D).transpose(2, 0, 1), 1),
      Rule(("blocks", "attn", "v_DKH"), _LAYER + "self_attn.v_proj.weight", ("KH", "D"),
           lambda w: w.reshape(K, H, D).transpose(2, 0, 1), 1),
      Rule(("blocks", "attn", "o_NHD"), _LAYER + "self_attn.o_proj.weight", ("D", "NH"),
           lambda w: w.reshape(D, N, H).transpose(1, 2, 0), 1),
  ]
  if is_fused(names):
    moe = _LAYER + "mlp."
    return common + [
        Rule(("blocks", "moe", "router_DE"), moe + "gate.weight", ("E", "D"), lambda w: w.T, 1),
        Rule(("blocks", "moe", "w1_EDF"), moe + "experts.gate_up_proj", ("E", "2F", "D"),
             lambda w: w[:, :F].transpose(0, 2, 1), 1),
        Rule(("blocks", "moe", "w3_EDF"), moe + "experts.gate_up_proj", ("E", "2F", "D"),
             lambda w: w[:, F:].transpose(0, 2, 1), 1),
        Rule(("blocks", "moe", "w2_EFD"), moe + "experts.down_proj", ("E", "D", "F"),
             lambda w: w.transpose(0, 2, 1), 1),
    ]
  moe = _LAYER + "block_sparse_moe."
  return common + [
      Rule(("blocks", "moe", "router_DE"), moe + "gate.weight", ("E", "D"), lambda w: w.T, 1),
      Rule(("blocks", "moe", "w1_EDF"), moe + "experts.{e}.w1.weight", ("F", "D"), lambda w: w.T, 2),
      Rule(("blocks", "moe", "w3_EDF"), moe + "experts.{e}.w3.weight", ("F", "D"), lambda w: w.T, 2),
      Rule(("blocks", "moe", "w2_EFD"), moe + "experts.{e}.w2.weight", ("D", "F"), lambda w: w.T, 2),
  ]
