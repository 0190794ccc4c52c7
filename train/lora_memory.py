"""Analytic memory of one LoRA / QLoRA train step on one device (the hand count beside the compiled plan).

Terms, in bytes (compute dtype c = 2 bytes for bf16; B sequences of T tokens; remat "full"):

  base        frozen weights. Quantized sites (attention q/k/v/o, every expert's w1/w3/w2) in their
              stored form - nf4: K/2 code bytes + 4 bytes per 64-entry block (0.5625 B/weight); int8: 1
              byte + a float32 scale per output channel; none: c bytes. Everything else (embedding, LM
              head, router, norms) in c bytes.
  adapters    P adapter parameters (``mixtral_jax.lora.spec.adapter_params``) x 16 bytes: float32
              value, gradient, and AdamW's two moments.
  saved       the residual stream kept at each layer boundary for the backward pass: L x B x T x D x c.
  layer       the largest one-layer working set while a layer is recomputed and differentiated:
              its quantized sites dequantized to c (once for the forward, once for the backward): attention
              whole, the experts one at a time (``mixtral_jax.expert_dequant``, the bucketed path); the
              MoE rows (B T k tokens x (2F + D) x c, x 3 for silu(h1) * h3 and their cotangents), the
              attention projections (B T (N + 2K) H c, x 4: q, k, v, the output and their cotangents;
              flash attention, no [T, S] logits), and a CE chunk of logits.

The sum is a floor for the compiled program's peak: XLA adds fusion temporaries, collectives' buffers
and alignment, and may keep two layers' dequantized weights alive across the scan boundary. ``mixtral-jax
plan`` compiles the real step and reports both.
"""

from __future__ import annotations

import dataclasses

from mixtral_jax import quant_nf4
from mixtral_jax.config import MixtralConfig
from mixtral_jax.lora.spec import LoraSection, adapter_params

GIB = 2**30
BASE_QUANTIZE = ("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraMemory:
  base: int
  adapters: int
  saved: int
  layer: int

  @property
  def total(self) -> int:
    return self.base + self.adapters + self.saved + self.layer

  def table(self) -> str:
    rows = [("frozen base", self.base), ("adapters + grads + AdamW", self.adapters),
            ("saved layer inputs", self.saved), ("one layer's working set", self.layer), ("total", self.total)]
    return "\n".join(f"  {name:<26} {b / GIB:8.2f} GiB" for name, b in rows)


EXPERT_SITES = ("w1", "w3", "w2")


def site_shapes(cfg: MixtralConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """Per layer: site -> (our shape, contracted axes counted from the end)."""
  D, N, K, H, F, E = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size,
                      cfg.intermediate_size, cfg.num_local_experts)
  return {"q": ((D, N, H), (-3,)), "k": ((D, K, H), (-3,)), "v": ((D, K, H), (-3,)), "o": ((N, H, D), (-3, -2)),
          "w1": ((E, D, F), (-2,)), "w3": ((E, D, F), (-2,)), "w2": ((E, F, D), (-2,))}


def stored_bytes(shape: tuple[int, ...], axes: tuple[int, ...], base_quantize: str, c: int) -> int:
  """Bytes of one site in its stored form (module docstring)."""
  n = 1
  for s in shape:
    n *= s
  if base_quantize == "nf4":
    return quant_nf4.nbytes(shape, axes)
  if base_quantize == "int8":
    contracted = 1
    for a in axes:
      contracted *= shape[a]
    return n + 4 * (n // contracted)
  return n * c


def estimate(cfg: MixtralConfig, lora: LoraSection, batch: int, seq_len: int, base_quantize: str = "nf4",
             compute_bytes: int = 2, ce_chunk: int = 2048) -> LoraMemory:
  """The four terms of the module docstring for ``batch`` x ``seq_len`` tokens on one device."""
  if base_quantize not in BASE_QUANTIZE:
    raise ValueError(f"lora.base_quantize={base_quantize!r} is not one of {', '.join(BASE_QUANTIZE)}")
  c, L, D, V = compute_bytes, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
  N, K, H, F, k = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, cfg.intermediate_size,
                   cfg.num_experts_per_tok)
  sites = site_shapes(cfg)
  per_layer = sum(stored_bytes(s, a, base_quantize, c) for s, a in sites.values())
  other = (2 * V * D + L * (D * cfg.num_local_experts + 2 * D) + D) * c
  base = L * per_layer + other
  adapters = 16 * adapter_params(cfg, lora)
  tokens = batch * seq_len
  saved = L * tokens * D * c
  # attention dequantized whole, the experts one at a time (mixtral_jax.expert_dequant); x 2: forward, backward
  one_expert = {n: _count(sh) // (cfg.num_local_experts if n in EXPERT_SITES else 1) for n, (sh, _) in sites.items()}
  dequantized = 0 if base_quantize == "none" else 2 * sum(one_expert.values()) * c
  moe = 3 * tokens * k * (2 * F + D) * c
  attn = 4 * tokens * (N + 2 * K) * H * c
  logits = batch * min(ce_chunk, seq_len) * V * 4
  return LoraMemory(base, adapters, saved, dequantized + max(moe, attn) + logits)


def _count(shape) -> int:
  n = 1
  for s in shape:
    n *= s
  return n
