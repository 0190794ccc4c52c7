"""Mixtral configuration: one frozen dataclass, named presets, and Hugging Face `config.json` I/O.

Dimension vocabulary used across the package (nanodo style, defined once here):

  B batch      T query length   S key/value length   D hidden (model) width
  N query heads   K key/value heads   H head dim   F expert FFN width
  E experts    k active experts per token (``top_k``)   V vocabulary   L layers
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

MoEImpl = Literal["auto", "blocked", "ragged", "dense", "triton", "mosaic_gpu"]
MOE_IMPLS = ("auto", "blocked", "ragged", "dense", "triton", "mosaic_gpu")
AttentionImpl = Literal["auto", "dense", "blockwise", "splash", "cudnn", "flash"]
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "splash", "cudnn", "flash")


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
  """Architecture of a Mixtral model plus the few runtime knobs that change how it is computed.

  The architecture fields mirror Hugging Face's ``MixtralConfig``. The runtime fields (``dtype``,
  ``param_dtype``, ``capacity_factor``, ``moe_impl``, ``moe_block``, ``remat``, ``attention_impl``,
  ``attention_block``) never change what the model
  computes in exact arithmetic, except ``capacity_factor``, which drops routed pairs past capacity.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096  # D
  intermediate_size: int = 14336  # F
  num_hidden_layers: int = 32  # L
  num_attention_heads: int = 32  # N
  num_key_value_heads: int = 8  # K
  head_dim: int | None = None  # H; None means D // N
  num_local_experts: int = 8  # E
  num_experts_per_tok: int = 2  # k
  max_position_embeddings: int = 32768
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-5
  sliding_window: int | None = None
  router_aux_loss_coef: float = 0.02
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int | None = None
  initializer_range: float = 0.02

  # Runtime knobs (not part of the Hugging Face config).
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of parameters (the master weights when training)
  capacity_factor: float | None = None  # None: dropless. Otherwise C = ceil(cf * tokens * k / E).
  # Grouped expert matmul (mixtral_jax.experts): auto picks triton (tokamax grouped GEMM) on GPU,
  # ragged (lax.ragged_dot, XLA:TPU's Mosaic kernel) on TPU, blocked on CPU.
  moe_impl: MoEImpl = "auto"
  moe_block: int = 128  # row block of the blocked grouped matmul (CPU)
  remat: str = "none"  # none | full | dots (see mixtral_jax.model.REMAT_POLICIES)
  # Attention kernel (mixtral_jax.attn): auto picks splash on TPU, cuDNN on GPU (flash, tokamax's Triton
  # kernel, for packed or padded rows) where they express the mask, else dense for short sequences and
  # blockwise (pure-JAX flash, O(T * block) memory) for long ones.
  attention_impl: AttentionImpl = "auto"
  attention_block: int = 512  # query and key block of blockwise attention

  def __post_init__(self):
    problems = []
    if self.num_attention_heads % self.num_key_value_heads:
      problems.append(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
      problems.append(
          f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_local_experts="
          f"{self.num_local_experts}]")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      problems.append(
          f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
          f"{self.num_attention_heads}; set head_dim explicitly")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      problems.append(f"capacity_factor must be positive or None (dropless), got {self.capacity_factor}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      problems.append(f"sliding_window must be positive or None, got {self.sliding_window}")
    if self.moe_impl not in MOE_IMPLS:
      problems.append(f"moe_impl={self.moe_impl!r} is not one of {', '.join(MOE_IMPLS)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      problems.append(f"attention_impl={self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    if self.attention_block <= 0:
      problems.append(f"attention_block must be positive, got {self.attention_block}")
    if problems:
      raise ValueError("invalid MixtralConfig: " + "; ".join(problems))

  @property
  def head_size(self) -> int:
    """H, the per-head width (``head_dim`` if set, else D // N)."""
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

  def replace(self, **changes: Any) -> "MixtralConfig":
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- Hugging Face config.json

  _RUNTIME_FIELDS = ("dtype", "param_dtype", "capacity_factor", "moe_impl", "moe_block", "remat", "attention_impl",
                     "attention_block")

  def to_hf_dict(self) -> dict[str, Any]:
    """The ``config.json`` that transformers' ``MixtralConfig`` reads."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._RUNTIME_FIELDS}
    if d["head_dim"] is None:
      d["head_dim"] = self.head_size
    d.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        hidden_act="silu",
        attention_dropout=0.0,
        router_jitter_noise=0.0,
        output_router_logits=False,
        use_cache=True,
        torch_dtype="bfloat16" if self.param_dtype == "bfloat16" else "float32",
    )
    return d

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **runtime: Any) -> "MixtralConfig":
    """Reads a Hugging Face ``config.json`` dict (old ``rope_theta`` and new ``rope_parameters`` forms)."""
    if d.get("model_type", "mixtral") not in ("mixtral",):
      raise ValueError(f"config.json has model_type={d.get('model_type')!r}; mixtral-jax reads 'mixtral' only")
    if d.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (Mixtral uses silu)")
    kw: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)} - set(cls._RUNTIME_FIELDS)
    for name in names:
      if name in d and d[name] is not None:
        kw[name] = d[name]
    # Newer transformers folds rope_theta into rope_parameters = {"rope_type": ..., "rope_theta": ...}.
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if isinstance(rope, dict):
      rope_type = rope.get("rope_type", rope.get("type", "default"))
      if rope_type not in ("default", None):
        raise ValueError(f"rope_type={rope_type!r} is not supported; Mixtral uses plain RoPE ('default')")
      if rope.get("rope_theta") is not None:
        kw["rope_theta"] = rope["rope_theta"]
    if "sliding_window" in d:  # explicit null means no window
      kw["sliding_window"] = d["sliding_window"]
    if kw.get("head_dim") is not None and kw["head_dim"] * kw.get("num_attention_heads", cls.num_attention_heads) \
        == kw.get("hidden_size", cls.hidden_size):
      kw["head_dim"] = None  # the default D // N: keep one canonical form so configs compare equal
    if isinstance(kw.get("eos_token_id"), list):
      kw["eos_token_id"] = kw["eos_token_id"][0]
    if "torch_dtype" in d or "dtype" in d:
      src = d.get("dtype") or d.get("torch_dtype")
      runtime.setdefault("param_dtype", "bfloat16" if src == "bfloat16" else "float32")
    return cls(**kw, **runtime)

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)

  @classmethod
  def load(cls, path: str | os.PathLike, **runtime: Any) -> "MixtralConfig":
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(d, **runtime)


# ------------------------------------------------------------------------------------ presets

PRESETS: dict[str, MixtralConfig] = {
    # Small enough to train on two CPU cores in minutes, with the real 32000-piece tokenizer.
    "tiny": MixtralConfig(
        vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=2048, router_aux_loss_coef=0.02),
    # The benchmark configuration of the issues (V 32000, D 512, L 4, H 8/2, F 1792, E 8, k 2).
    "bench-small": MixtralConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, router_aux_loss_coef=0.02),
    "mixtral-8x7b": MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, router_aux_loss_coef=0.02),
    "mixtral-8x22b": MixtralConfig(
        vocab_size=32000, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
        num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=65536, router_aux_loss_coef=0.001),
    "mixtral-8x22b-instruct": MixtralConfig(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
        num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=65536, router_aux_loss_coef=0.001),
}


def get_config(name: str, **overrides: Any) -> MixtralConfig:
  """Returns the named preset (``tiny``, ``bench-small``, ``mixtral-8x7b``, ``mixtral-8x22b``,
  ``mixtral-8x22b-instruct``), with any field overridden."""
  try:
    cfg = PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
  return cfg.replace(**overrides) if overrides else cfg
