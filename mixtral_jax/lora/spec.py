"""What to adapt: the run config's ``lora`` section, its checks against a model, and a base fingerprint.

A LoRA adapter on a weight W (in -> out) adds ``(x A) B * alpha / r`` to ``x W``: A is [in, r], B is
[r, out], r the rank. Targets name the adapted weights:

  q, k, v, o   attention projections (per layer)
  w1, w2, w3   expert FFN weights, one adapter per expert (A [E, D, r], B [E, r, F]; w2 [E, F, r], [E, r, D])
  router       the router D -> E
  lm_head      the output head D -> V
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from mixtral_jax import param_paths
from mixtral_jax.config import MixtralConfig

TARGETS = ("q", "k", "v", "o", "w1", "w2", "w3", "router", "lm_head")
DEFAULT_TARGETS = ("q", "k", "v", "o", "w1", "w2", "w3")
BASE_QUANTIZE = (None, "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraSection:
  """The run config's ``lora`` section. ``rank: null`` (the default) trains every weight in full."""
  rank: int | None = None  # r; set it (e.g. 16) to train adapters on a frozen base instead
  alpha: float = 32.0  # the adapter output is scaled by alpha / rank
  dropout: float = 0.0  # PEFT's dropout on the adapters' inputs, in training only
  targets: tuple = DEFAULT_TARGETS  # from q, k, v, o, w1, w2, w3, router, lm_head
  # the frozen base's stored form: None (the compute dtype), "int8" or "nf4" (QLoRA: attention and every
  # expert's w1/w2/w3 in 4-bit NormalFloat, dequantized per layer inside the scan; no base gradient)
  base_quantize: str | None = None
  # serving only (``mixtral_jax.lora.bank``): the rank axis holds a bank of adapters side by side, each
  # ``slot_rank`` columns wide, and every batch row uses only its own adapter's columns
  slot_rank: int | None = None

  @property
  def enabled(self) -> bool:
    return self.rank is not None

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)

  def problems(self) -> list[str]:
    """What is wrong with the section on its own (no model needed); empty when it is fine or off."""
    if not self.enabled:
      if self.base_quantize is not None:
        return [f"lora.base_quantize={self.base_quantize} needs LoRA: a quantized base cannot be trained in full; "
                "set lora.rank (e.g. 16) or drop lora.base_quantize"]
      return []
    out = []
    if self.base_quantize not in BASE_QUANTIZE:
      out.append(f"lora.base_quantize={self.base_quantize!r}; choose from {', '.join(map(str, BASE_QUANTIZE))}")
    if self.rank <= 0:
      out.append(f"lora.rank={self.rank}; the rank must be a positive integer such as 8 or 16 (or null for full "
                 "fine-tuning)")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      out.append(f"lora.targets has unknown name(s) {unknown}; choose from {', '.join(TARGETS)}")
    if not self.targets:
      out.append(f"lora.targets is empty; choose from {', '.join(TARGETS)}")
    if len(set(self.targets)) != len(self.targets):
      out.append(f"lora.targets={list(self.targets)} names a target twice")
    if not 0.0 <= self.dropout < 1.0:
      out.append(f"lora.dropout={self.dropout}; the dropout probability must be in [0, 1), e.g. 0.05")
    return out


def target_dims(cfg: MixtralConfig) -> dict[str, tuple[int, int]]:
  """(in, out) of each target's weight (per expert for w1, w2, w3)."""
  out = {}
  for t in TARGETS:
    w = param_paths.weight(t)
    dims = param_paths.shape(w, cfg)[1 if w.ours[0] == "E" else 0:]
    out[t] = (math.prod(dims[:w.contracted]), math.prod(dims[w.contracted:]))
  return out


def adapter_params(cfg: MixtralConfig, lora: LoraSection, *, active: bool = False) -> int:
  """Adapter parameters of the model (``active``: those one token multiplies, k of the E experts' adapters
  per expert target), (in + out) * r per adapted weight."""
  dims = target_dims(cfg)
  experts = cfg.num_experts_per_tok if active else cfg.num_local_experts
  total = 0
  for t in lora.targets:
    per = sum(dims[t]) * lora.rank
    if t in ("w1", "w2", "w3"):
      per *= experts
    total += per if t == "lm_head" else per * cfg.num_hidden_layers
  return total


def validate(lora: LoraSection, cfg: MixtralConfig) -> None:
  """Raises ValueError naming every problem of ``lora`` for this model (before anything compiles)."""
  problems = lora.problems()
  if not problems and lora.enabled:
    dims = target_dims(cfg)
    too_big = [f"{t} ({dims[t][0]} -> {dims[t][1]})" for t in lora.targets if lora.rank > min(dims[t])]
    if too_big:
      problems.append(f"lora.rank={lora.rank} is larger than the smaller dimension of target(s) "
                      f"{', '.join(too_big)}; lower the rank or drop those targets")
  if problems:
    raise ValueError("invalid lora section: " + "; ".join(problems))


def fingerprint(cfg: MixtralConfig) -> str:
  """A short hash of the architecture (the Hugging Face config fields, which fix every weight's shape and
  meaning): two bases with the same fingerprint take the same adapters."""
  arch = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("torch_dtype", "dtype", "transformers_version")}
  return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_difference(a: MixtralConfig, b: MixtralConfig) -> str:
  """The architecture fields where ``a`` and ``b`` differ, e.g. 'hidden_size 64 != 128'."""
  da, db = a.to_hf_dict(), b.to_hf_dict()
  diffs = [f"{k} {da.get(k)} != {db.get(k)}" for k in sorted(set(da) | set(db))
           if da.get(k) != db.get(k) and k not in ("torch_dtype", "dtype", "transformers_version")]
  return ", ".join(diffs) or "no architecture field differs"
