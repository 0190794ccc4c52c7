"""The one registry of parameter paths: every stored weight of the model, where it sits in
``nnx.state(model, nnx.Param)``, and what each consumer needs to know about it.

One :class:`Weight` row per parameter. Everything else derives from :data:`WEIGHTS`:

  - the module that creates it (:func:`create`: shape and logical axes from the row);
  - the int8 (and later 4-bit) quantization sites (:func:`quant_sites`): rows with ``quantize=True``;
  - LoRA targets and the parameter each adapts (:func:`lora_keys`);
  - the Hugging Face (Hub per-expert and transformers-5 fused), Mistral consolidated and export key maps
    (``mixtral_jax.checkpoint.hf`` / ``consolidated`` / ``export`` build their rules from :func:`torch_to_ours`
    and :func:`ours_to_torch`);
  - the expert weights that ``mixtral_jax.model.layer_views`` cuts per expert (:data:`EXPERT_IDS`).

Adding a weight is one row here; adding a format is one column (a name template per row).

Shape symbols: V vocab, D hidden, N query heads, K kv heads, H head dim, F expert FFN, E experts;
"NH" = N*H, "KH" = K*H, "2F" = 2*F. ``ours`` spells our array's axes; ``torch`` the shape of the tensor in
a torch file (``Linear`` weights are ``[out, in]``; ours are ``[in..., out...]``, so a ``linear`` row is
transposed on the way and reshaped to the unit's shape).

A row's ``unit`` says how many of our leading axes enumerate torch tensors in the Hub and consolidated
files: 0 the whole parameter, 1 one per layer (``{l}``), 2 one per layer and expert (``{l}``, ``{e}``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixtral_jax.config import MixtralConfig

Key = tuple[str, ...]
_HF_LAYER = "model.layers.{l}."
_CON_LAYER = "layers.{l}."


@dataclasses.dataclass(frozen=True)
class Weight:
  id: str  # short name: the LoRA target name for adaptable weights ("q", "w1", "lm_head", ...)
  key: Key  # path in nnx.state(model, nnx.Param); the last part is the attribute on its module
  ours: tuple[str, ...]  # our axes, per layer (the layer stack prepends L)
  axes: tuple[str, ...]  # logical axis names, one per axis of ``ours``
  torch: tuple[str, ...]  # the torch tensor's shape in the Hub / consolidated files, per unit
  hf: str  # Hub tensor name
  consolidated: str  # Mistral consolidated tensor name
  unit: int  # see the module docstring
  linear: bool = True  # a torch Linear [out, in] (transposed on the way); False: copied as is
  contracted: int = 1  # how many trailing-from-the-left "in" axes of ``ours`` a matmul contracts
  quantize: bool = False  # an int8 / 4-bit site (router, embedding and norms stay in their dtype)
  lora: bool = False  # a LoRA target
  rope: str | None = None  # consolidated q/k rows are RoPE-interleaved over this many heads ("N"/"K")
  fused: tuple[str, int | None] | None = None  # transformers-5 in-memory tensor and half (0/1) or None


WEIGHTS: tuple[Weight, ...] = (
    Weight("embed", ("embed_VD",), ("V", "D"), ("vocab", "embed"), ("V", "D"), "model.embed_tokens.weight",
           "tok_embeddings.weight", 0, linear=False),
    Weight("attn_norm", ("blocks", "attn_norm", "scale"), ("D",), ("norm",), ("D",),
           _HF_LAYER + "input_layernorm.weight", _CON_LAYER + "attention_norm.weight", 1, linear=False),
    Weight("q", ("blocks", "attn", "q_DNH"), ("D", "N", "H"), ("embed", "heads", "head_dim"), ("NH", "D"),
           _HF_LAYER + "self_attn.q_proj.weight", _CON_LAYER + "attention.wq.weight", 1, quantize=True, lora=True,
           rope="N"),
    Weight("k", ("blocks", "attn", "k_DKH"), ("D", "K", "H"), ("embed", "kv_heads", "head_dim"), ("KH", "D"),
           _HF_LAYER + "self_attn.k_proj.weight", _CON_LAYER + "attention.wk.weight", 1, quantize=True, lora=True,
           rope="K"),
    Weight("v", ("blocks", "attn", "v_DKH"), ("D", "K", "H"), ("embed", "kv_heads", "head_dim"), ("KH", "D"),
           _HF_LAYER + "self_attn.v_proj.weight", _CON_LAYER + "attention.wv.weight", 1, quantize=True, lora=True),
    Weight("o", ("blocks", "attn", "o_NHD"), ("N", "H", "D"), ("heads", "head_dim", "embed"), ("D", "NH"),
           _HF_LAYER + "self_attn.o_proj.weight", _CON_LAYER + "attention.wo.weight", 1, contracted=2,
           quantize=True, lora=True),
    Weight("moe_norm", ("blocks", "moe_norm", "scale"), ("D",), ("norm",), ("D",),
           _HF_LAYER + "post_attention_layernorm.weight", _CON_LAYER + "ffn_norm.weight", 1, linear=False),
    Weight("router", ("blocks", "moe", "router_DE"), ("D", "E"), ("embed", "router_experts"), ("E", "D"),
           _HF_LAYER + "block_sparse_moe.gate.weight", _CON_LAYER + "feed_forward.gate.weight", 1, lora=True,
           fused=(_HF_LAYER + "mlp.gate.weight", None)),
    Weight("w1", ("blocks", "moe", "w1_EDF"), ("E", "D", "F"), ("experts", "expert_embed", "expert_mlp"), ("F", "D"),
           _HF_LAYER + "block_sparse_moe.experts.{e}.w1.weight", _CON_LAYER + "feed_forward.experts.{e}.w1.weight",
           2, quantize=True, lora=True, fused=(_HF_LAYER + "mlp.experts.gate_up_proj", 0)),
    Weight("w2", ("blocks", "moe", "w2_EFD"), ("E", "F", "D"), ("experts", "expert_mlp", "expert_embed"), ("D", "F"),
           _HF_LAYER + "block_sparse_moe.experts.{e}.w2.weight", _CON_LAYER + "feed_forward.experts.{e}.w2.weight",
           2, quantize=True, lora=True, fused=(_HF_LAYER + "mlp.experts.down_proj", None)),
    Weight("w3", ("blocks", "moe", "w3_EDF"), ("E", "D", "F"), ("experts", "expert_embed", "expert_mlp"), ("F", "D"),
           _HF_LAYER + "block_sparse_moe.experts.{e}.w3.weight", _CON_LAYER + "feed_forward.experts.{e}.w3.weight",
           2, quantize=True, lora=True, fused=(_HF_LAYER + "mlp.experts.gate_up_proj", 1)),
    Weight("final_norm", ("final_norm", "scale"), ("D",), ("norm",), ("D",), "model.norm.weight", "norm.weight", 0,
           linear=False),
    Weight("lm_head", ("head_DV",), ("D", "V"), ("embed", "vocab"), ("V", "D"), "lm_head.weight", "output.weight", 0,
           quantize=True, lora=True),
)
BY_ID: dict[str, Weight] = {w.id: w for w in WEIGHTS}
BY_KEY: dict[Key, Weight] = {w.key: w for w in WEIGHTS}
EXPERT_IDS = ("w1", "w3", "w2")  # the order the expert kernels take them in
LARGEST = BY_ID["w1"].key  # a checkpoint's storage dtype is that of its largest tensors


def weight(id_: str) -> Weight:
  return BY_ID[id_]


def attr(id_: str) -> str:
  """The attribute that stores weight ``id_`` on its module (``"q_DNH"``)."""
  return BY_ID[id_].key[-1]


def sizes(cfg: MixtralConfig) -> dict[str, int]:
  """Shape symbol -> size for ``cfg``."""
  N, K, H, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, cfg.intermediate_size
  return {"V": cfg.vocab_size, "D": cfg.hidden_size, "N": N, "K": K, "H": H, "F": F, "E": cfg.num_local_experts,
          "NH": N * H, "KH": K * H, "2F": 2 * F}


def shape(w: Weight, cfg: MixtralConfig) -> tuple[int, ...]:
  """Our per-layer shape of ``w``."""
  s = sizes(cfg)
  return tuple(s[a] for a in w.ours)


def quant_sites() -> dict[Key, tuple[int, ...]]:
  """Quantized parameter key -> its contracted axes counted from the end (so the same entry serves the
  layer-stacked parameter): the ``contracted`` leading "in" axes of ``ours``, minus an expert axis."""
  out = {}
  for w in WEIGHTS:
    if w.quantize:
      first = 1 if w.ours[0] == "E" else 0
      out[w.key] = tuple(i - len(w.ours) for i in range(first, first + w.contracted))
  return out


def lora_keys() -> dict[str, Key]:
  """LoRA target -> the key of the parameter it adapts (what ``lora.merge`` adds ``A B * scale`` to)."""
  return {w.id: w.key for w in WEIGHTS if w.lora}


# ------------------------------------------------------------------------------------ torch layouts


def torch_to_ours(w: Weight, cfg: MixtralConfig, *, interleaved: bool = False):
  """A function from one torch tensor (shape ``w.torch``) to one unit of our parameter. ``interleaved``:
  consolidated q/k rows, RoPE pairs interleaved, become our half-split layout."""
  s = sizes(cfg)
  unit_shape = tuple(s[a] for a in w.ours[max(0, w.unit - 1):])
  if not w.linear:
    return lambda t: t
  if interleaved and w.rope is not None:
    heads = s[w.rope]
    return lambda t: _rotary_to_half_split(t, heads)
  return lambda t: t.T.reshape(unit_shape)


def ours_to_torch(w: Weight, cfg: MixtralConfig):
  """The inverse for the Hub layout: one unit of our parameter -> the torch tensor ``w.torch``."""
  s = sizes(cfg)
  torch_shape = tuple(s[a] for a in w.torch)
  if not w.linear:
    return lambda a: a
  return lambda a: a.reshape(torch_shape[::-1]).T


def fused_to_ours(w: Weight, cfg: MixtralConfig):
  """transformers-5 fused experts ``[E, 2F, D]`` / ``[E, D, F]`` (one tensor per layer) -> our ``[E, in, out]``."""
  _, half = w.fused
  F = cfg.intermediate_size
  if half is None:
    return lambda t: np.swapaxes(t, -1, -2) if t.ndim == 3 else t.T
  return lambda t: t[:, half * F:(half + 1) * F].transpose(0, 2, 1)


def fused_torch_shape(w: Weight) -> tuple[str, ...]:
  if w.fused[1] is not None:
    return ("E", "2F", "D")
  return ("E",) + w.torch if w.unit == 2 else w.torch


def _rotary_to_half_split(t: np.ndarray, heads: int) -> np.ndarray:
  """Rows of wq/wk ``[heads*H, D]`` from interleaved to half-split pairs, as ``[D, heads, H]``."""
  HD, D = t.shape
  H = HD // heads
  return t.reshape(heads, H // 2, 2, D).transpose(3, 0, 2, 1).reshape(D, heads, H)

