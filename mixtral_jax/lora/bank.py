"""Many adapters served at once, unmerged: a bank of their factors beside one frozen base.

``serve --adapter NAME=PATH`` (repeatable) loads each adapter (a PEFT directory or a mixtral-jax LoRA run,
per-expert adapters included) with :func:`mixtral_jax.lora.merge.load_factors`, which checks it against
the served base, and lays them side by side along the rank axis of one LoRA model:

  A_bank [..., in, S*r] = [A_1 | A_2 | ... | A_S]      B_bank [..., S*r, out] = [B_1 s_1; B_2 s_2; ...; B_S s_S]

for the S adapters, each zero-padded to the largest rank r over all adapters and targets (zero columns of
A and zero rows of B add exact zeros), with its scale ``s = alpha / r`` folded into B (the bank's own scale
is 1). A target that an adapter does not adapt is zero in its block. Slot 0 is the base: it owns no
columns. Each batch row carries its adapter slot (``adapter_B``), and every adapted projection and expert
kernel keeps only that slot's columns of ``x A_bank`` before multiplying by ``B_bank``
(``adapters.slot_columns``, ``expert_adapters.own_columns``), so a row computes

  x W + (x A_s) B_s alpha_s / r_s

exactly, for its own adapter s, and the base row x W. The cost is that of one adapter of rank S*r on
every row (the other columns are computed and zeroed): small beside the base matmuls for a few adapters.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from mixtral_jax.config import MixtralConfig

from . import adapters as adapters_lib
from .factors import Factors
from .spec import LoraSection

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


@dataclasses.dataclass(frozen=True)
class Bank:
  """``names[i]`` is served from slot i + 1; ``section`` makes the model's adapters (rank S*r, scale 1,
  ``slot_rank`` r); ``values`` are their pure-dict tree for :func:`mixtral_jax.lora.merge.attach`."""
  names: tuple[str, ...]
  section: LoraSection
  values: dict


def parse_adapter_flags(flags: list[str], base_name: str) -> list[tuple[str, str]]:
  """``["NAME=PATH", ...]`` -> [(name, path)]; ValueError (one line) on a malformed, reused or base name."""
  out: list[tuple[str, str]] = []
  for flag in flags:
    name, sep, path = flag.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--adapter {flag!r}: expected NAME=PATH, e.g. --adapter sql=runs/sql-lora")
    if not NAME.match(name):
      raise ValueError(f"--adapter {flag!r}: the name must be letters, digits and . _ : / - (it is the request's "
                       "'model' field)")
    if name == base_name or name in dict(out):
      raise ValueError(f"--adapter {flag!r}: the name {name!r} is already taken by "
                       f"{'the base model' if name == base_name else 'another --adapter'}; pick another name")
    out.append((name, path))
  return out


def load_bank(named: list[tuple[str, str]], cfg: MixtralConfig) -> Bank:
  """The bank of the adapters ``[(name, path)]`` for the base ``cfg``: each loaded and checked against the
  base (a missing path or a mismatched target, rank or shape is a ValueError naming the adapter)."""
  from .merge import load_factors  # noqa: PLC0415 - merge imports the checkpoint package

  loaded = []
  for name, path in named:
    try:
      loaded.append((name, load_factors(path, cfg)))
    except (ValueError, FileNotFoundError, KeyError) as e:
      raise ValueError(f"--adapter {name}={path}: {e}") from None
  return build_bank(loaded, cfg)


def build_bank(named: list[tuple[str, list[Factors]]], cfg: MixtralConfig) -> Bank:
  """The bank of adapters given as factors (already checked against ``cfg``), slot i + 1 for named[i]."""
  if not named:
    raise ValueError("a bank needs at least one adapter")
  loaded = [factors for _, factors in named]
  rank = max(f.A.shape[-1] for factors in loaded for f in factors)
  targets = tuple(t for t in adapters_lib.LAYOUT if any(f.target == t for fs in loaded for f in fs))
  S = len(named)
  section = LoraSection(rank=S * rank, alpha=float(S * rank), targets=targets, slot_rank=rank)
  values = {}
  for t in targets:
    a_shape, b_shape = adapters_lib.shapes(cfg, t, S * rank)
    if t != "lm_head":
      a_shape, b_shape = (cfg.num_hidden_layers,) + a_shape, (cfg.num_hidden_layers,) + b_shape
    A, B = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
    for s, factors in enumerate(loaded):
      for f in factors:
        if f.target == t:
          _place(f, A, B, s * rank)
    values[adapters_lib.adapter_key(t, "A")] = A
    values[adapters_lib.adapter_key(t, "B")] = B
  from mixtral_jax.checkpoint.orbax_io import unflatten  # noqa: PLC0415 - the checkpoint package imports lora

  return Bank(tuple(n for n, _ in named), section, unflatten(values))


def _place(f: Factors, A: np.ndarray, B: np.ndarray, col: int) -> None:
  """Writes one adapter's factors into the bank at rank columns ``col..col + r``: A's rank is its last
  axis, B's the one after its leading (layer, expert) axes; B scaled by the adapter's alpha / r."""
  r = f.A.shape[-1]
  A[..., col:col + r] = f.A
  index = (slice(None),) * f.lead + (slice(col, col + r),)
  B[index] = f.B.astype(np.float32) * np.float32(f.scale)


def attach_bank(model, bank: Bank):
  """A model serving ``bank`` beside ``model``'s weights (shared, not copied): see the module docstring."""
  import jax  # noqa: PLC0415

  from .merge import attach  # noqa: PLC0415

  return attach(model, bank.section, jax.tree.map(jax.numpy.asarray, bank.values))
