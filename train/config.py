"""The run configuration: one frozen dataclass of sections, read from YAML, overridden on the command line.

A YAML run config has up to seven sections (every key optional; defaults below)::

  model:      preset or converted checkpoint, plus MixtralConfig runtime overrides (dtype, remat, ...)
  data:       what to read and how to cut it: format text|chat, paths, tokenizer, batch_size, seq_len
  optimizer:  AdamW with linear warmup then cosine decay, global-norm clipping, gradient accumulation
  loss:       load-balancing pooling (pooled|per_layer), router z-loss, cross-entropy chunk
  train:      steps, seed, mesh, checkpointing, logging, evaluation
  lora:       rank (null: full fine-tuning), alpha, dropout, targets, base_quantize (see mixtral_jax.lora)
  dpo:        beta, label_smoothing, loss_type, for data.format: preference (see mixtral_jax.train.dpo)

Overrides are ``section.key=value`` strings (``--set optimizer.lr=1e-3``); values are parsed as YAML,
so ``1e-3``, ``null``, ``true`` and ``[a, b]`` mean what they look like.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from typing import Any, Iterable

import yaml

from mixtral_jax.lora.spec import LoraSection


@dataclasses.dataclass(frozen=True)
class ModelSection:
  preset: str | None = "tiny"  # a mixtral_jax preset name, used when no checkpoint is given
  checkpoint: str | None = None  # a converted (Orbax) checkpoint to start from: continue-pretrain, sft
  overrides: dict = dataclasses.field(default_factory=dict)  # MixtralConfig fields: dtype, remat, ...


@dataclasses.dataclass(frozen=True)
class DataSection:
  format: str = "text"  # text: packed documents; chat: JSONL of {"messages": [...]}, loss on assistant turns
  paths: tuple = ("stdlib",)  # files, directories, globs ("stdlib": the Python standard library source),
  #                             tokenized on first use into WORKDIR/data; or `mixtral-jax tokenize` shard dirs
  sources: tuple = ()  # shard dirs mixed by weight: [{path: DIR, weight: 0.7}, ...]; overrides paths
  field: str = "text"  # JSONL field / Parquet column holding the text (text format)
  workers: int = 1  # tokenizer processes for first-use tokenization of data.paths
  extensions: tuple = (".py",)  # file suffixes read from directories (text format)
  heldout_fraction: float = 0.02  # fraction of files (text) or examples (chat, preference pairs) held out
  tokenizer: str = "v1"  # "v1", "v3" or a path to a tokenizer.model
  chat_version: str = "v1"  # instruct template for chat data: v1 (8x7B-Instruct) or v3 (8x22B-Instruct)
  batch_size: int = 8  # global sequences per optimizer step (all microbatches, all processes)
  seq_len: int = 256
  max_files: int | None = None  # read at most this many files (sorted order), for quick runs


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
  lr: float = 3e-3
  warmup_steps: int = 20
  decay_steps: int | None = None  # cosine length after warmup; None: until train.steps
  min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1  # not applied to norm scales
  clip_norm: float | None = 1.0  # global gradient norm; None: no clipping
  grad_accum: int = 1  # microbatches per step; data.batch_size must be a multiple


@dataclasses.dataclass(frozen=True)
class LossSection:
  aux_mode: str = "pooled"  # pooled: transformers' load_balancing_loss_func; per_layer: Switch/GShard mean
  z_loss_coef: float = 0.0  # router z-loss (ST-MoE) weight
  ce_chunk: int = 64  # sequence positions per chunk of the fused LM-head + cross-entropy scan


@dataclasses.dataclass(frozen=True)
class TrainSection:
  steps: int = 300
  seed: int = 0
  mesh: str | None = None  # e.g. "data=2,expert=4"; None: all devices on the data axis
  # A CPU test aid: split the devices, in order, into this many equal groups that stand for slices, so a
  # dcn_ mesh (dcn_data=2,fsdp=2,expert=2) runs on simulated CPU devices (sharding.mesh.make_mesh).
  # Refused on TPU devices, which carry their own slice_index; a real multi-slice run leaves it null.
  simulated_slices: int | None = None
  checkpoint_every: int = 100
  keep: int = 3  # checkpoints kept
  async_checkpoint: bool = True
  log_every: int = 1  # metrics.jsonl / TensorBoard every this many steps (and at each evaluation)
  print_every: int = 10  # without a terminal (or with progress off): a plain console line every this many steps
  eval_every: int = 50  # held-out loss every this many steps (0: never)
  eval_batches: int = 4
  peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: measure a large matmul
  progress: bool = True  # a progress bar when stdout and stderr are terminals
  barrier_timeout_s: float = 300.0  # multi-process barriers give up (naming the late process) after this
  # activation remat policy (mixtral_jax.model.REMAT_POLICIES: none, save_projections, dots, save_attn_moe_in,
  # offload, offload_projections, offload_gate_up, full); None: the model's (model.overrides.remat, else
  # the preset's)
  remat: str | None = None
  profile: str | None = None  # "START:END": a jax.profiler trace of those steps in <workdir>/profile


@dataclasses.dataclass(frozen=True)
class DpoSection:
  """Direct preference optimisation (``data.format: preference``; see ``mixtral_jax.train.dpo``)."""
  beta: float = 0.1  # the KL weight: rewards are beta * (log pi - log pi_ref)
  label_smoothing: float = 0.0  # cDPO: the assumed share of flipped preference labels (sigmoid loss only)
  loss_type: str = "sigmoid"  # sigmoid (DPO) or ipo


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelSection = ModelSection()
  data: DataSection = DataSection()
  optimizer: OptimizerSection = OptimizerSection()
  loss: LossSection = LossSection()
  train: TrainSection = TrainSection()
  lora: LoraSection = LoraSection()
  dpo: DpoSection = DpoSection()

  def __post_init__(self):
    problems = self.lora.problems() + _range_problems(self)
    if problems:  # the checks below divide by some of these
      raise ValueError("invalid run config: " + "; ".join(problems))
    if self.loss.aux_mode not in ("pooled", "per_layer"):
      problems.append(f"loss.aux_mode={self.loss.aux_mode!r}; choose pooled or per_layer")
    if self.data.format not in ("text", "chat", "preference"):
      problems.append(f"data.format={self.data.format!r}; choose text, chat or preference (DPO)")
    if self.data.format == "preference":
      if not self.lora.enabled:
        problems.append("data.format=preference (DPO) needs LoRA: its reference model is the base with the "
                        "adapters off; set lora.rank (e.g. 16) or use --config dpo-lora")
      try:
        from mixtral_jax.train.dpo import check_options  # noqa: PLC0415
        check_options(self.dpo.beta, self.dpo.label_smoothing, self.dpo.loss_type)
      except ValueError as e:
        problems.append(str(e))
    if self.optimizer.grad_accum < 1 or self.data.batch_size % self.optimizer.grad_accum:
      problems.append(f"data.batch_size={self.data.batch_size} is not a multiple of "
                      f"optimizer.grad_accum={self.optimizer.grad_accum}")
    if self.data.seq_len % self.loss.ce_chunk and self.loss.ce_chunk < self.data.seq_len:
      problems.append(f"data.seq_len={self.data.seq_len} is not a multiple of loss.ce_chunk={self.loss.ce_chunk}")
    if self.model.preset is None and self.model.checkpoint is None:
      problems.append("set model.preset or model.checkpoint")
    problems += _pod_problems(self.train)
    if problems:
      raise ValueError("invalid run config: " + "; ".join(problems))

  @property
  def microbatch(self) -> int:
    return self.data.batch_size // self.optimizer.grad_accum

  # ------------------------------------------------------------------------- dict / YAML I/O

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for section in d.values():
      for k, v in section.items():
        if isinstance(v, tuple):
          section[k] = list(v)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any] | None) -> "TrainConfig":
    d = d or {}
    sections = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(d) - set(sections)
    if unknown:
      raise ValueError(f"unknown run-config section(s) {sorted(unknown)}; sections are {', '.join(sections)}")
    built = {}
    for f in dataclasses.fields(cls):
      section_cls = type(f.default)
      values = d.get(f.name) or {}
      if not isinstance(values, dict):
        raise ValueError(f"run-config section {f.name!r} must be a mapping, got {values!r}")
      known = {g.name for g in dataclasses.fields(section_cls)}
      bad = set(values) - known
      if bad:
        raise ValueError(f"unknown key(s) {sorted(bad)} in section {f.name!r}; known: {', '.join(sorted(known))}")
      types = {g.name: g.type for g in dataclasses.fields(section_cls)}
      values = {k: _coerce(v, types[k], f"{f.name}.{k}") for k, v in values.items()}
      built[f.name] = section_cls(**values)
    return cls(**built)

  def override(self, items: Iterable[str] | dict[str, Any]) -> "TrainConfig":
    """Applies ``section.key=value`` overrides (strings parsed as YAML) or a {dotted key: value} dict."""
    return TrainConfig.from_dict(_apply_overrides(self.to_dict(), items))

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      yaml.safe_dump(self.to_dict(), f, sort_keys=False)


# (dotted key, smallest allowed value): checked before anything compiles, so a zero or negative setting is
# one line here instead of a ZeroDivisionError (or a silent run) after the first step.
_AT_LEAST = (("data.batch_size", 1), ("data.seq_len", 1), ("data.workers", 1), ("optimizer.lr", 0.0),
             ("optimizer.warmup_steps", 0), ("optimizer.grad_accum", 1), ("loss.ce_chunk", 1),
             ("train.steps", 1), ("train.checkpoint_every", 1), ("train.keep", 1), ("train.log_every", 1),
             ("train.print_every", 1), ("train.eval_every", 0), ("train.eval_batches", 1))


def _pod_problems(train: TrainSection) -> list[str]:
  """train.remat names a policy; train.simulated_slices is a count; train.profile is a START:END range
  inside the run's steps."""
  from mixtral_jax.model import REMAT_POLICIES  # noqa: PLC0415 - the model only when validating
  from .profiling import parse_profile  # noqa: PLC0415

  problems = []
  if train.remat is not None and train.remat not in REMAT_POLICIES:
    problems.append(f"train.remat={train.remat!r} is no remat policy; choose one of {', '.join(REMAT_POLICIES)}")
  if train.simulated_slices is not None and train.simulated_slices < 1:
    problems.append(f"train.simulated_slices={train.simulated_slices} is below 1; set a slice count or null")
  try:
    parse_profile(train.profile, train.steps)
  except ValueError as e:
    problems.append(str(e))
  return problems


def _range_problems(cfg: "TrainConfig") -> list[str]:
  """One message per setting below its smallest meaningful value (see ``_AT_LEAST``)."""
  problems = []
  for key, least in _AT_LEAST:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value < least:
      what = "negative" if least == 0 else f"below {least}"
      problems.append(f"{key}={value} is {what}; set it to at least {least}")
  return problems


def _apply_overrides(d: dict[str, Any], items: Iterable[str] | dict[str, Any]) -> dict[str, Any]:
  """``d`` (a full config dict, not yet validated) with the overrides applied; see ``TrainConfig.override``."""
  pairs = items.items() if isinstance(items, dict) else (_split_override(s) for s in items)
  for key, value in pairs:
    if key.count(".") < 1:
      raise ValueError(f"override {key!r}: use section.key=value, e.g. optimizer.lr=1e-3")
    section, name = key.split(".", 1)
    if section not in d:
      raise ValueError(f"override {key!r}: no section {section!r}; sections are {', '.join(d)}")
    if not isinstance(d[section], dict):
      raise ValueError(f"run-config section {section!r} must be a mapping, got {d[section]!r}")
    if section == "model" and name.startswith("overrides."):
      d["model"]["overrides"] = {**(d["model"]["overrides"] or {}), name.split(".", 1)[1]: value}
      continue
    if name not in d[section]:
      raise ValueError(f"override {key!r}: section {section!r} has no key {name!r}; "
                       f"known: {', '.join(sorted(d[section]))}")
    d[section][name] = value
  return d


def _defaults_with(raw: Any, where: str) -> dict[str, Any]:
  """The default config as a dict with the sections of ``raw`` (a parsed YAML file) laid over it. Not
  validated yet: ``from_dict`` checks the result once every override is applied."""
  if raw is not None and not isinstance(raw, dict):
    raise ValueError(f"run config {where}: expected a mapping of sections, got {type(raw).__name__}")
  d = TrainConfig().to_dict()
  for section, values in (raw or {}).items():
    if section in d and isinstance(values, dict):
      d[section] = {**d[section], **values}
    elif section in d and values is None:
      continue
    else:
      d[section] = values  # an unknown section or a non-mapping: from_dict names the problem
  return d


def _coerce(value: Any, type_name: str, where: str) -> Any:
  """Checks a value against its field's annotation, converting what YAML leaves ambiguous: ``1e-3``
  (a string to YAML 1.1) to float, integers to float, lists to tuples."""
  if isinstance(value, list):
    return tuple(value)
  if value is None:
    if "None" not in type_name:
      raise ValueError(f"{where} cannot be null")
    return None
  base = type_name.split("|")[0].strip()
  try:
    if base == "float" and not isinstance(value, bool):
      return float(value)
    if base == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
      return int(float(value))
  except (TypeError, ValueError):
    raise ValueError(f"{where}={value!r} is not a number") from None
  if base in ("int", "float"):
    raise ValueError(f"{where}={value!r} is not {'an integer' if base == 'int' else 'a number'}")
  if base == "bool" and not isinstance(value, bool):
    raise ValueError(f"{where}={value!r} must be true or false")
  return value


def _split_override(item: str) -> tuple[str, Any]:
  if "=" not in item:
    raise ValueError(f"override {item!r}: expected section.key=value, e.g. optimizer.lr=1e-3")
  key, raw = item.split("=", 1)
  return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def packaged_configs() -> list[str]:
  """Names of the run configs shipped in ``mixtral_jax/configs``."""
  files = importlib.resources.files("mixtral_jax").joinpath("configs")
  return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | None, overrides: Iterable[str] = (),
                flags: dict[str, Any] | None = None) -> TrainConfig:
  """A packaged config by name (``tiny-pretrain``), or a YAML file by path, with ``section.key=value``
  overrides and then ``flags`` ({dotted key: value}, the CLI's plain flags) applied. The result is
  validated once, with everything applied, so a config may leave a required key to the command line
  (continue-pretrain and sft leave ``model.checkpoint`` to ``--checkpoint``)."""
  if name_or_path is None:
    raw = None
  elif os.path.exists(name_or_path):
    raw = _parse(open(name_or_path).read(), name_or_path)
  else:
    res = importlib.resources.files("mixtral_jax").joinpath("configs", f"{name_or_path}.yaml")
    if not res.is_file():
      raise FileNotFoundError(f"run config {name_or_path!r} is neither a file nor a packaged config "
                              f"({', '.join(packaged_configs())})")
    raw = _parse(res.read_text(), name_or_path)
  d = _apply_overrides(_defaults_with(raw, name_or_path), list(overrides))
  return TrainConfig.from_dict(_apply_overrides(d, flags or {}))


def _parse(text: str, name: str) -> Any:
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ValueError(f"run config {name}: not valid YAML ({e})") from None


# Settings a resumed run must keep: its checkpoints' data iterator state and step count only mean something
# for the same data, cut the same way.
RESUME_KEYS = (("data", "format"), ("data", "paths"), ("data", "sources"), ("data", "tokenizer"),
               ("data", "batch_size"), ("data", "seq_len"))


def check_resume(workdir: str, cfg: TrainConfig) -> None:
  """Refuses to resume ``workdir`` (one with checkpoints and a ``train_config.yaml``) under a run config
  whose data paths, tokenizer, batch or sequence length differ from the ones it was trained with. Called
  before anything writes into the workdir, so the saved ``train_config.yaml`` stays as it was."""
  saved_path = os.path.join(workdir, "train_config.yaml")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not (os.path.isfile(saved_path) and os.path.isdir(checkpoints) and os.listdir(checkpoints)):
    return
  saved = _parse(open(saved_path).read(), saved_path) or {}
  now = cfg.to_dict()
  differ = []
  for section, key in RESUME_KEYS:
    before = (saved.get(section) or {}).get(key, now[section][key])
    if _normal(before) != _normal(now[section][key]):
      differ.append(f"{section}.{key} was {before!r}, now {now[section][key]!r}")
  if differ:
    raise ValueError(f"{workdir} was trained with other data settings ({'; '.join(differ)}); resume with the "
                     "same ones, use a new --workdir, or pass --restart to move its checkpoints aside")


def _normal(value: Any) -> Any:
  return list(value) if isinstance(value, (list, tuple)) else value
