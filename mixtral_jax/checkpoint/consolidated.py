"""Mistral's own release format: ``params.json`` plus ``consolidated*.safetensors`` or ``consolidated.00.pth``.

  ours                       consolidated  (names spelled once, in ``mixtral_jax.param_paths``)
  embed_VD                   tok_embeddings.weight [V, D]
  head_DV                    output.weight [V, D] (transposed)
  final_norm.scale           norm.weight
  blocks.attn_norm.scale[l]  layers.{l}.attention_norm.weight
  blocks.moe_norm.scale[l]   layers.{l}.ffn_norm.weight
  q_DNH[l], k_DKH[l]         layers.{l}.attention.wq/wk.weight [N*H, D], rotary rows interleaved (see below)
  v_DKH[l]                   layers.{l}.attention.wv.weight [K*H, D]
  o_NHD[l]                   layers.{l}.attention.wo.weight [D, N*H]
  router_DE[l]               layers.{l}.feed_forward.gate.weight [E, D]
  w1/w3_EDF[l, e]            layers.{l}.feed_forward.experts.{e}.w1/w3.weight [F, D]
  w2_EFD[l, e]               layers.{l}.feed_forward.experts.{e}.w2.weight [D, F]

Rotary layout: Mistral rotates interleaved pairs (rows 2i, 2i+1 of a head), Hugging Face and we rotate
halves (rows i, i + H/2). Within each head, our row s*H/2 + i is Mistral's row 2i + s, so the rows of
wq/wk are regrouped ``[N, H/2, 2, D] -> [N, 2, H/2, D]``, the permutation transformers' conversion script
applies (``mixtral_jax.param_paths.torch_to_ours(..., interleaved=True)``). A ``params.json`` without ``rope_theta`` means 1e6, as in mistral-inference.

``.pth`` files load with ``torch.load(weights_only=True, mmap=True)``: no pickled code runs, and
tensors are read lazily from the mapped file. torch is needed only for them.
"""

from __future__ import annotations

import glob
import json
import os

import ml_dtypes
import numpy as np

from mixtral_jax import param_paths
from mixtral_jax.checkpoint.layout import Dims, Rule
from mixtral_jax.checkpoint.safetensors_io import SafetensorsSource
from mixtral_jax.config import MixtralConfig

PARAMS = "params.json"
DEFAULT_ROPE_THETA = 1e6


def load_config(directory: str, **runtime) -> MixtralConfig:
  path = os.path.join(directory, PARAMS)
  try:
    with open(path) as f:
      p = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if "moe" not in p:
    raise ValueError(f"{path} has no 'moe' section: this is a dense Mistral model, not a Mixtral")
  required = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "norm_eps")
  absent = [k for k in required if k not in p]
  if absent:
    raise ValueError(f"{path} lacks {', '.join(absent)}; expected Mistral's params.json fields {', '.join(required)}")
  return MixtralConfig(
      vocab_size=p["vocab_size"], hidden_size=p["dim"], intermediate_size=p["hidden_dim"],
      num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"],
      head_dim=p.get("head_dim"), num_local_experts=p["moe"]["num_experts"],
      num_experts_per_tok=p["moe"]["num_experts_per_tok"], rms_norm_eps=p["norm_eps"],
      rope_theta=p.get("rope_theta") or DEFAULT_ROPE_THETA, sliding_window=p.get("sliding_window"),
      max_position_embeddings=p.get("max_seq_len", MixtralConfig.max_position_embeddings), **runtime)


def weight_files(directory: str) -> list[str]:
  st = sorted(glob.glob(os.path.join(directory, "consolidated*.safetensors")))
  if st:
    return st
  pth = sorted(glob.glob(os.path.join(directory, "consolidated*.pth")))
  if len(pth) > 1:
    raise ValueError(f"{directory} holds {len(pth)} .pth files ({', '.join(map(os.path.basename, pth))}): a "
                     "model-parallel split, which mixtral-jax does not merge; use the single-file release")
  if not pth:
    raise FileNotFoundError(f"{directory} has {PARAMS} but no consolidated*.safetensors or consolidated.00.pth")
  return pth


def open_source(directory: str):
  files = weight_files(directory)
  return PthSource(files[0]) if files[0].endswith(".pth") else SafetensorsSource(files)


class PthSource:
  """A ``consolidated.00.pth`` read lazily through ``torch.load(mmap=True, weights_only=True)``."""

  def __init__(self, path: str):
    try:
      import torch  # noqa: PLC0415 - only .pth needs torch
    except ImportError:
      raise ValueError(f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), or convert "
                       "the safetensors release instead") from None
    self.path = path
    try:
      self._tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; report the cause once
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      cause = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else repr(e))
      raise ValueError(f"{path}: cannot be read safely with torch.load(weights_only=True): {cause}") from None
    if not isinstance(self._tensors, dict):
      raise ValueError(f"{path}: expected a dict of tensors, found {type(self._tensors).__name__}")

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name].shape)

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(self._tensors[name].dtype) == "torch.bfloat16" else np.dtype(
        str(self._tensors[name].dtype).removeprefix("torch."))

  def read(self, name: str) -> np.ndarray:
    import torch  # noqa: PLC0415

    t = self._tensors[name]
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()

  def release(self, name: str) -> None:
    """torch owns the mapping; its clean file pages are reclaimed by the OS under pressure."""

  def where(self, name: str) -> str:
    return self.path


def dims(cfg: MixtralConfig) -> Dims:
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
  return Dims(
      sizes={"V": (cfg.vocab_size, "vocab_size"), "D": (cfg.hidden_size, "dim"),
             "F": (cfg.intermediate_size, "hidden_dim"), "E": (cfg.num_local_experts, "moe.num_experts"),
             "NH": (N * H, "n_heads*head_dim"), "KH": (K * H, "n_kv_heads*head_dim")},
      config_file=PARAMS, layers=(cfg.num_hidden_layers, "n_layers"),
      experts=(cfg.num_local_experts, "moe.num_experts"))


def rules(cfg: MixtralConfig) -> list[Rule]:
  """One rule per row of ``mixtral_jax.param_paths``; q/k rows from interleaved to half-split RoPE pairs."""
  return [Rule(w.key, w.consolidated, w.torch, param_paths.torch_to_ours(w, cfg, interleaved=True), w.unit)
          for w in param_paths.WEIGHTS]
