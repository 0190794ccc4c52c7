"""Hugging Face PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``) in and out.

Names and layouts (transformers >= 5 Mixtral, peft 0.21; torch weights are [out, in]):

  ours                      PEFT tensor (prefix base_model.model.model.layers.{l}.)   lora_A / lora_B
  q, k, v: A [D, r]         self_attn.{q,k,v}_proj                                   [r, D] / [N*H or K*H, r]
  o: A [N, H, r]            self_attn.o_proj                                         [r, N*H] / [D, r]
  router: A [D, r]          mlp.gate (target_parameters mlp.gate.weight)             [r, D] / [E, r]
  lm_head: A [D, r]         base_model.model.lm_head                                 [r, D] / [V, r]
  w1, w3: A [E, D, r]       mlp.experts (target_parameters mlp.experts.gate_up_proj) [E*R, D] / [2F, R*E]
  w2: A [E, F, r]           mlp.experts (target_parameters mlp.experts.down_proj)    [E*R, F] / [D, R*E]

The expert tensors are fused: ``gate_up_proj`` is [E, 2F, D] (w1 rows, then w3 rows). peft reads its
``lora_A`` as (E, R, in), expert-major, and ``lora_B`` as (out, R, E), expert-minor, and
delta_e = B[:, :, e] @ A[e] * scale. One adapter covers [w1; w3], so separate w1 and w3 adapters of
rank r leave as one rank-2r adapter: A stacked, B block-diagonal (exact). With both expert tensors
adapted, peft wraps the parameter twice and names the adapters by depth: ``mlp.experts.base_layer.lora_*``
is ``gate_up_proj``, ``mlp.experts.lora_*`` is ``down_proj``; shapes tell them apart on reading.

peft has one rank per config (``rank_pattern`` aside), so on export every adapter is zero-padded to the
largest rank R and ``lora_alpha`` is set to ``scale * R``: peft's scale alpha/R is then ours, and the
padding adds exact zeros. On import, each module's own scale (``alpha_pattern``, ``rank_pattern``,
``use_rslora``) is folded into its B.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from mixtral_jax.config import MixtralConfig

from .factors import Factors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.([qkvo])_proj|mlp\.gate|mlp\.experts(?:\.base_layer)?)"
                    r"\.lora_([AB])(?:\.weight)?$")
_HEAD = re.compile(r"^lm_head\.lora_([AB])(?:\.weight)?$")


# ------------------------------------------------------------------------------------ in


def _pattern_value(patterns: dict, module: str, default):
  for key, value in (patterns or {}).items():
    if re.search(rf"(^|\.){key}$", module) or module == key:
      return value
  return default


def read_peft(directory: str, cfg: MixtralConfig) -> list[Factors]:
  """Factors (scale folded into B, so scale 1) from a PEFT LoRA adapter for the base ``cfg``.

  Steps: read and check ``adapter_config.json``; group the tensors into each module's (lora_A, lora_B)
  pair; turn each pair into our per-layer layout with its own scale folded in (``_module_factors``);
  stack the layers of each target (``_stack``)."""
  from safetensors.numpy import load_file  # noqa: PLC0415

  cfg_path, weights = os.path.join(directory, CONFIG), os.path.join(directory, WEIGHTS)
  if not os.path.isfile(cfg_path) or not os.path.isfile(weights):
    raise FileNotFoundError(f"{directory} is neither a PEFT adapter ({CONFIG} + {WEIGHTS}) nor a mixtral-jax "
                            "LoRA run (lora.json + checkpoints/)")
  pc = _read_config(cfg_path)

  def scale(module: str, r: int) -> float:
    alpha = float(_pattern_value(pc.get("alpha_pattern"), module, pc.get("lora_alpha", 8)))
    r_cfg = int(_pattern_value(pc.get("rank_pattern"), module, r))
    return alpha / (math.sqrt(r_cfg) if pc.get("use_rslora") else r_cfg)

  # (target, layer or None) -> (A, B) in our per-layer layout, scale folded into B
  found: dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray]] = {}
  for module, (a, b) in _module_pairs(load_file(weights), weights).items():
    found.update(_module_factors(module, a, b, cfg, scale, weights))
  return _stack(found, cfg.num_hidden_layers)


def _read_config(cfg_path: str) -> dict:
  """``adapter_config.json``, refused unless it is a plain LoRA adapter."""
  with open(cfg_path) as f:
    pc = json.load(f)
  unsupported = [name for name, bad in (
      ("peft_type", pc.get("peft_type", "LORA") != "LORA"), ("use_dora", bool(pc.get("use_dora"))),
      ("bias", pc.get("bias", "none") != "none"), ("modules_to_save", bool(pc.get("modules_to_save"))),
      ("fan_in_fan_out", bool(pc.get("fan_in_fan_out")))) if bad]
  if unsupported:
    raise ValueError(f"{cfg_path}: {', '.join(f'{n}={pc.get(n)!r}' for n in unsupported)} is not supported; only "
                     "plain LoRA adapters (peft_type LORA, no DoRA, bias none, no modules_to_save) can be loaded")
  return pc


def _module_pairs(tensors: dict[str, np.ndarray], weights: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{module name without the PEFT prefix: (lora_A, lora_B) as float32}; ValueError naming tensors that
  map onto no Mixtral module, or a factor without its partner."""
  pairs: dict[str, dict[str, np.ndarray]] = {}
  unmapped = []
  for name, value in tensors.items():
    short = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    if short.endswith(".base_layer.weight"):  # peft saves an adapted lm_head's base weight beside it
      continue
    m, h = _LAYER.match(short), _HEAD.match(short)
    if not (m or h):
      unmapped.append(name)
      continue
    module = short.rsplit(".lora_", 1)[0]
    pairs.setdefault(module, {})[(m or h).group(m.lastindex if m else 1)] = value.astype(np.float32)
  if unmapped:
    shown = ", ".join(sorted(unmapped)[:4]) + (f" ({len(unmapped)} in all)" if len(unmapped) > 4 else "")
    raise ValueError(f"{weights}: cannot map adapter tensor(s) {shown} onto Mixtral; supported targets are "
                     "q_proj, k_proj, v_proj, o_proj, mlp.gate, lm_head and the fused expert tensors "
                     "(target_parameters mlp.experts.gate_up_proj / down_proj); drop the others from the adapter")
  for module, ab in pairs.items():
    if set(ab) != {"A", "B"}:
      raise ValueError(f"{weights}: module {module} has lora_{next(iter(ab))} but not its partner")
  return {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}


def _module_factors(module: str, a: np.ndarray, b: np.ndarray, cfg: MixtralConfig, scale, weights: str) -> dict:
  """One PEFT module's torch-layout factors ([r, in], [out, r]) -> {(target, layer): (A, B)} in ours,
  ``scale(module, r)`` folded into B."""
  N, K, H, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, cfg.num_hidden_layers
  if module == "lm_head":
    return {("lm_head", None): (a.T, b.T * scale(module, a.shape[0]))}
  l = int(module.split(".")[2])
  if l >= L:
    raise ValueError(f"{weights}: tensor for layer {l}, but the base has {L} layers (num_hidden_layers); the "
                     "adapter was made for another base model")
  kind = module.split(".", 3)[3]
  if kind.startswith("self_attn"):
    t = kind[len("self_attn.")]
    r, s = a.shape[0], scale(module, a.shape[0])
    if t == "o":
      return {("o", l): (_reshape(a.T, (N, H, r), module, cfg), b.T * s)}
    out = {"q": (N, H), "k": (K, H), "v": (K, H)}[t]
    return {(t, l): (a.T, _reshape(b.T * s, (r,) + out, module, cfg))}
  if kind == "mlp.gate":
    return {("router", l): (a.T, b.T * scale(module, a.shape[0]))}
  return _expert_factors(module, l, a, b, cfg, scale, weights)


def _expert_factors(module: str, l: int, a: np.ndarray, b: np.ndarray, cfg: MixtralConfig, scale,
                    weights: str) -> dict:
  """The fused expert tensors: which one (gate_up_proj or down_proj) by shape; peft's A is (E, R, in),
  expert-major, its B (out, R, E), expert-minor; gate_up's B splits into w1's and w3's columns."""
  D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
  if a.shape[0] % E:
    raise ValueError(f"{weights}: {module}.lora_A has {a.shape[0]} rows, not a multiple of the {E} experts "
                     "(num_local_experts); the adapter was made for another base model")
  R = a.shape[0] // E
  gate_up = b.shape[0] == 2 * F and a.shape[1] == D
  down = b.shape[0] == D and a.shape[1] == F
  if not (gate_up or down):
    raise ValueError(f"{weights}: {module} factors {list(a.shape)} x {list(b.shape)} fit neither gate_up_proj "
                     f"[E*R, {D}] x [{2 * F}, R*E] nor down_proj [E*R, {F}] x [{D}, R*E] of this base "
                     f"(hidden_size={D}, intermediate_size={F}); the adapter was made for another base model")
  s = scale(module + (".gate_up_proj" if gate_up else ".down_proj"), R)
  A_EiR = a.reshape(E, R, -1).transpose(0, 2, 1)
  B_ERo = b.reshape(b.shape[0], R, E).transpose(2, 1, 0) * s
  if gate_up:
    return {("w1", l): (A_EiR, B_ERo[..., :F]), ("w3", l): (A_EiR, B_ERo[..., F:])}
  return {("w2", l): (A_EiR, B_ERo)}


def _reshape(x, shape, module, cfg):
  if x.size != math.prod(shape):
    raise ValueError(f"adapter module {module} has a factor of shape {list(x.shape)} that does not fit this base "
                     f"(hidden_size={cfg.hidden_size}, heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
                     f"head_dim={cfg.head_size}); the adapter was made for another base model")
  return x.reshape(shape)


def _stack(found: dict, L: int) -> list[Factors]:
  """Per-layer factors -> one Factors per target over all layers (absent layers and smaller ranks are
  zero-padded, which adds exact zeros)."""
  out = []
  for target in sorted({t for t, _ in found}):
    if target == "lm_head":
      a, b = found[(target, None)]
      out.append(Factors(target, a, b, 1.0))
      continue
    layers = {l: ab for (t, l), ab in found.items() if t == target}
    R = max(a.shape[-1] for a, _ in layers.values())
    a0, b0 = next(iter(layers.values()))
    ra = len(a0.shape) - 1  # the rank axis of A (last); of B it is the one after the expert axis, if any
    rb = 1 if target in ("w1", "w2", "w3") else 0
    A = np.zeros((L,) + a0.shape[:-1] + (R,), np.float32)
    B = np.zeros((L,) + b0.shape[:rb] + (R,) + b0.shape[rb + 1:], np.float32)
    for l, (a, b) in layers.items():
      r = a.shape[ra]
      A[l][..., :r] = a
      B[l][(slice(None),) * rb + (slice(0, r),)] = b
    out.append(Factors(target, A, B, 1.0))
  return out


# ------------------------------------------------------------------------------------ out


def write_peft(factors: list[Factors], cfg: MixtralConfig, dst: str, *, base_path: str | None) -> None:
  """Writes ``factors`` (all of one scale) as a PEFT adapter directory ``dst`` (created, must not exist
  half-written: the caller wraps it in ``formats.atomic_dir``).

  Every adapter is zero-padded to one rank R (2r when w1 or w3 is adapted: they leave as one fused
  rank-2r adapter) and ``lora_alpha`` is ``scale * R``, so peft's alpha/R is our scale."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  by = {f.target: f for f in factors}
  scales = {f.scale for f in factors}
  assert len(scales) == 1, scales
  scale = scales.pop()
  r = max(f.A.shape[-1] for f in factors)
  R = 2 * r if ("w1" in by or "w3" in by) else r
  tensors = {}
  for l in range(cfg.num_hidden_layers):
    tensors.update(_layer_tensors(by, l, cfg, r, R))
  if "lm_head" in by:
    A, B = by["lm_head"].A, by["lm_head"].B
    tensors[_PREFIX + "lm_head.lora_A.weight"] = _pad_rank(A, R, -1).T
    tensors[_PREFIX + "lm_head.lora_B.weight"] = _pad_rank(B, R, 0).T
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(dst, CONFIG), "w") as f:
    json.dump(_peft_config(by, R, scale, base_path), f, indent=2)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, os.path.join(dst, WEIGHTS))


def _pad_rank(x: np.ndarray, R: int, axis: int) -> np.ndarray:
  """``x`` zero-padded along its rank axis to R (the padding adds exact zeros to the delta)."""
  shape = list(x.shape)
  shape[axis] = R - x.shape[axis]
  return np.concatenate([x, np.zeros(shape, x.dtype)], axis=axis)


def _layer_tensors(by: dict[str, Factors], l: int, cfg: MixtralConfig, r: int, R: int) -> dict[str, np.ndarray]:
  """Layer ``l``'s PEFT tensors in torch layout ([r, in] / [out, r]), padded to rank R."""
  D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
  lay, out = _PREFIX + f"model.layers.{l}.", {}
  for t in ("q", "k", "v"):
    if t in by:
      A, B = by[t].A[l], by[t].B[l]  # [D, r], [r, N, H]
      out[lay + f"self_attn.{t}_proj.lora_A.weight"] = _pad_rank(A, R, -1).T
      out[lay + f"self_attn.{t}_proj.lora_B.weight"] = _pad_rank(B.reshape(B.shape[0], -1), R, 0).T
  if "o" in by:
    A, B = by["o"].A[l], by["o"].B[l]  # [N, H, r], [r, D]
    out[lay + "self_attn.o_proj.lora_A.weight"] = _pad_rank(A.reshape(-1, A.shape[-1]), R, -1).T
    out[lay + "self_attn.o_proj.lora_B.weight"] = _pad_rank(B, R, 0).T
  if "router" in by:
    A, B = by["router"].A[l], by["router"].B[l]  # [D, r], [r, E]
    out[lay + "mlp.gate.lora_A.weight"] = _pad_rank(A, R, -1).T
    out[lay + "mlp.gate.lora_B.weight"] = _pad_rank(B, R, 0).T
  gate_up = "w1" in by or "w3" in by
  if gate_up:  # one rank-2r adapter for [w1; w3]: A stacked, B block-diagonal
    A_f = np.zeros((E, D, 2 * r), np.float32)
    B_f = np.zeros((E, 2 * r, 2 * F), np.float32)
    for i, t in enumerate(("w1", "w3")):
      if t in by:
        rt = by[t].A.shape[-1]
        A_f[:, :, i * r:i * r + rt] = by[t].A[l]
        B_f[:, i * r:i * r + rt, i * F:(i + 1) * F] = by[t].B[l]
    name = "mlp.experts.base_layer." if "w2" in by else "mlp.experts."  # peft names by wrapping depth
    out[lay + name + "lora_A.weight"] = A_f.transpose(0, 2, 1).reshape(E * R, D)
    out[lay + name + "lora_B.weight"] = B_f.transpose(2, 1, 0).reshape(2 * F, R * E)
  if "w2" in by:
    A, B = _pad_rank(by["w2"].A[l], R, -1), _pad_rank(by["w2"].B[l], R, 1)  # [E, F, R], [E, R, D]
    out[lay + "mlp.experts.lora_A.weight"] = A.transpose(0, 2, 1).reshape(E * R, F)
    out[lay + "mlp.experts.lora_B.weight"] = B.transpose(2, 1, 0).reshape(D, R * E)
  return out


def _peft_config(by: dict[str, Factors], R: int, scale: float, base_path: str | None) -> dict:
  """``adapter_config.json``: target_modules for the linear layers, target_parameters for the router and
  the fused expert tensors."""
  modules = [f"{t}_proj" for t in ("q", "k", "v", "o") if t in by] + (["lm_head"] if "lm_head" in by else [])
  params = ((["mlp.gate.weight"] if "router" in by else [])
            + (["mlp.experts.gate_up_proj"] if ("w1" in by or "w3" in by) else [])
            + (["mlp.experts.down_proj"] if "w2" in by else []))
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": R,
          "lora_alpha": scale * R, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
          "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
          "modules_to_save": None, "target_modules": modules or None, "target_parameters": params or None,
          "rank_pattern": {}, "alpha_pattern": {}}
