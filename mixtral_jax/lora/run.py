"""A LoRA training run on disk: ``WORKDIR/lora.json`` records the adapters' settings and the base they
belong to; ``WORKDIR/checkpoints/STEP/params`` holds the adapters only (the optimizer state beside them).

  {"lora": {"rank", "alpha", "dropout", "targets"},
   "base": {"checkpoint": path or null, "preset": name or null, "seed": int, "fingerprint": str,
            "config": the base's Hugging Face config}}

The fingerprint (``spec.fingerprint``) hashes the base architecture; a run refuses to resume, and
adapters refuse to load, onto a base whose fingerprint differs.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mixtral_jax.config import MixtralConfig

from .spec import LoraSection, describe_difference, fingerprint

RECORD = "lora.json"


def record(lora: LoraSection, cfg: MixtralConfig, *, checkpoint: str | None, preset: str | None, seed: int) -> dict:
  return {"lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
                   "base_quantize": lora.base_quantize},
          "base": {"checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
                   "preset": None if checkpoint else preset, "seed": seed, "fingerprint": fingerprint(cfg),
                   "config": cfg.to_hf_dict()}}


def is_lora_run(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(os.fspath(path), RECORD))


def read(run: str | os.PathLike) -> dict:
  path = os.path.join(os.fspath(run), RECORD)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{run} is not a LoRA training run ({RECORD} is missing); train one with "
                            "'mixtral-jax train --config lora-sft ...'")
  with open(path) as f:
    return json.load(f)


def section(rec: dict) -> LoraSection:
  d = rec["lora"]
  return LoraSection(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                     targets=tuple(d["targets"]), base_quantize=d.get("base_quantize"))


def base_config(rec: dict) -> MixtralConfig:
  return MixtralConfig.from_hf_dict(rec["base"]["config"])


def check_base(rec: dict, cfg: MixtralConfig, where: str, base_name: str) -> None:
  """Raises ValueError when ``cfg`` (the base about to be used) is not the base the run trained on."""
  if rec["base"]["fingerprint"] != fingerprint(cfg):
    trained = rec["base"]["checkpoint"] or f"preset {rec['base']['preset']!r}"
    raise ValueError(
        f"{where} holds LoRA adapters trained on base {trained} (fingerprint {rec['base']['fingerprint']}), but "
        f"{base_name} has fingerprint {fingerprint(cfg)} ({describe_difference(base_config(rec), cfg)}); use the "
        "base the adapters were trained on (or, to train afresh on this base, a new --workdir)")


def check_or_write(workdir: str, new: dict, *, write: bool) -> None:
  """At the start of a run: a workdir that already records a base must get the same base and the same
  adapter shapes; a fresh one gets ``new`` written (when ``write``, i.e. by the lead process)."""
  path = os.path.join(workdir, RECORD)
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old["base"]["fingerprint"] != new["base"]["fingerprint"]:
      check_base(old, base_config(new), workdir, new["base"]["checkpoint"] or f"preset {new['base']['preset']!r}")
    same = {k: old["lora"][k] for k in ("rank", "targets")} == {k: new["lora"][k] for k in ("rank", "targets")}
    if not same:
      raise ValueError(f"{workdir} holds adapters of rank {old['lora']['rank']} on {old['lora']['targets']}, but "
                       f"the run config asks for rank {new['lora']['rank']} on {new['lora']['targets']}; keep the "
                       "run's lora section to resume, or use a new --workdir")
    if old["base"]["checkpoint"] == new["base"]["checkpoint"]:
      return  # otherwise the same architecture at a new path (a moved base): record where it is now
  if write:
    with open(path, "w") as f:
      json.dump(new, f, indent=2)


def latest_adapters(run: str | os.PathLike) -> tuple[int, dict[tuple[str, ...], np.ndarray]]:
  """(step, {path: float32 array}) of the adapters in the newest checkpoint of a LoRA run."""
  from mixtral_jax.checkpoint.orbax_io import ParamsReader  # noqa: PLC0415

  ckpts = os.path.join(os.fspath(run), "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()
                 and os.path.isdir(os.path.join(ckpts, d, "params"))) if os.path.isdir(ckpts) else []
  if not steps:
    raise FileNotFoundError(f"{run} is a LoRA run with no checkpoint yet ({ckpts} has no step); train it first")
  reader = ParamsReader(os.path.join(ckpts, str(steps[-1]), "params"))
  return steps[-1], {k: np.asarray(reader.read(k), np.float32) for k in reader.shapes}
