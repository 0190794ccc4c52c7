"""The training loop: set up (all checks before anything compiles), resume or start, step, log, evaluate,
checkpoint, and stop cleanly on SIGTERM, on a NaN/inf loss, or at the last step.

Workdir contents: ``config.json`` (the model, HF form), ``train_config.yaml`` (the run config used),
``tokenizer.model`` (copied, so generation finds it), ``checkpoints/<step>/`` (see ``checkpointing``),
``metrics.jsonl``, ``tensorboard/``, ``data/`` (token shards of ``data.paths``, made on first use); with LoRA,
``lora.json`` (the adapters' settings and the base they belong to, see ``mixtral_jax.lora.run``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mixtral_jax import lora as lora_lib
from mixtral_jax.config import MixtralConfig, get_config
from mixtral_jax.lora import run as lora_run
from mixtral_jax.model import remat_policy
from mixtral_jax.sharding import distributed
from mixtral_jax.sharding.mesh import format_mesh, make_mesh
from mixtral_jax.tokenizer import Tokenizer

from . import data as data_lib
from . import step as step_lib
from .checkpointing import Checkpointer, barrier
from .config import TrainConfig, check_resume
from .metrics import MetricsLogger, measure_peak_flops, train_flops_per_token
from .profiling import Goodput, ProfileWindow, summary_line

log = logging.getLogger("mixtral_jax.train")


class TrainingDiverged(ValueError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class RunResult:
  start_step: int  # the step the run resumed from (0 for a fresh start)
  final_step: int
  losses: dict  # step -> training loss
  eval_losses: dict  # step -> held-out loss
  stopped_by_signal: bool = False


def model_config(cfg: TrainConfig) -> MixtralConfig:
  overrides = dict(cfg.model.overrides, **({"remat": cfg.train.remat} if cfg.train.remat else {}))
  if cfg.model.checkpoint:
    from mixtral_jax.checkpoint import load_config  # noqa: PLC0415 - checkpoint I/O only when used
    return load_config(cfg.model.checkpoint).replace(**overrides)
  return get_config(cfg.model.preset, **overrides)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _device_batch(batch: dict, sharding, global_shape) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v, global_shape) for k, v in batch.items()}


def _move_aside(path: str) -> None:
  if os.path.exists(path):
    n = 1
    while os.path.exists(f"{path}.before-restart-{n}"):
      n += 1
    os.rename(path, f"{path}.before-restart-{n}")
    log.warning("--restart: moved %s to %s", path, f"{path}.before-restart-{n}")


def _check_resumable(workdir: str, mcfg: MixtralConfig) -> None:
  """Refuses, before any work, to resume checkpoints of a different model than the config now asks for."""
  saved_path = os.path.join(workdir, "config.json")
  if not (os.path.isfile(saved_path) and os.path.isdir(os.path.join(workdir, "checkpoints"))
          and os.listdir(os.path.join(workdir, "checkpoints"))):
    return
  with open(saved_path) as f:
    saved = MixtralConfig.from_hf_dict(json.load(f)).to_hf_dict()
  now = mcfg.to_hf_dict()
  differ = [f"{k} {saved.get(k)} there, {now.get(k)} now" for k in sorted(set(saved) | set(now))
            if k != "torch_dtype" and saved.get(k) != now.get(k)]
  if differ:
    raise ValueError(f"{workdir} holds checkpoints of a different model ({'; '.join(differ)}); use a new "
                     "--workdir, or pass --restart to move its checkpoints aside")


@dataclasses.dataclass
class _Setup:
  """What the checks and the workdir set-up hand to the rest of the run."""
  mcfg: MixtralConfig
  mesh: jax.sharding.Mesh
  data: data_lib.Data


def run(cfg: TrainConfig, workdir: str, *, restart: bool = False) -> RunResult:
  """Trains per ``cfg`` in ``workdir``, resuming from its newest checkpoint. See the module docstring.

  Three phases: ``_setup`` (every input check, then data and the workdir's files), ``_restore_or_init``
  (the newest checkpoint, or the model checkpoint / a random init) and ``_loop`` (step, log, evaluate,
  checkpoint, stop on SIGTERM, NaN or the last step).
  """
  workdir = os.path.abspath(workdir)
  setup = _setup(cfg, workdir, restart=restart)
  step_fn, abstract_state, abstract_batch = step_lib.build_train_step(setup.mcfg, cfg, setup.mesh)
  eval_fn = step_lib.build_eval_step(setup.mcfg, cfg, setup.mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep,
                      async_save=cfg.train.async_checkpoint, timeout_s=cfg.train.barrier_timeout_s)
  state, resumed = _restore_or_init(cfg, setup, ckpt, abstract_state)
  return _loop(cfg, workdir, setup, ckpt, state, resumed=resumed, step_fn=step_fn, eval_fn=eval_fn,
               global_batch_shape=abstract_batch["inputs"].shape)


def _check_inputs(cfg: TrainConfig, workdir: str, *, restart: bool):
  """Every check that can fail on the user's input (config, model checkpoint, tokenizer, mesh), before
  anything is written, tokenized or compiled: a run refused here leaves no workdir behind.
  Returns (model config, LoRA record or None, tokenizer, mesh)."""
  mcfg = model_config(cfg)
  if cfg.data.seq_len > mcfg.max_position_embeddings:
    raise ValueError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context "
                     f"(max_position_embeddings={mcfg.max_position_embeddings}); lower data.seq_len")
  lora_record = None
  if cfg.lora.enabled:  # LoRA: adapters fit this model, and a resumed run keeps its base
    lora_lib.validate(cfg.lora, mcfg)
    lora_record = lora_run.record(cfg.lora, mcfg, checkpoint=cfg.model.checkpoint, preset=cfg.model.preset,
                                  seed=cfg.train.seed)
    lora_run.check_or_write(workdir, lora_record, write=False)
  elif lora_run.is_lora_run(workdir):
    raise ValueError(f"{workdir} is a LoRA run (its checkpoints hold adapters only) but the run config has no "
                     "lora.rank; keep the run's lora section to resume it, or use a new --workdir")
  tokenizer = Tokenizer.load(cfg.data.tokenizer)
  tokenizer.check_vocab(mcfg.vocab_size)
  mesh = make_mesh(cfg.train.mesh, num_experts=mcfg.num_local_experts, simulated_slices=cfg.train.simulated_slices)
  remat_policy(mcfg.remat, list(mesh.devices.flat))  # offload needs pinned host memory
  shards = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
  if cfg.microbatch % shards:
    raise ValueError(f"the microbatch of {cfg.microbatch} sequences (data.batch_size / optimizer.grad_accum) "
                     f"does not split over the {shards} batch shards of mesh {format_mesh(mesh)}; make it a "
                     "multiple, or choose another train.mesh")
  if not restart:  # a resume keeps the model and the data settings its checkpoints were made with
    _check_resumable(workdir, mcfg)
    check_resume(workdir, cfg)
  return mcfg, lora_record, tokenizer, mesh


def _setup(cfg: TrainConfig, workdir: str, *, restart: bool) -> _Setup:
  """Checks the inputs, then builds the data (it checks its paths before tokenizing; the token cache is
  the first thing in the workdir) and writes the workdir's config, run config, tokenizer and LoRA record;
  ``restart`` moves old checkpoints and metrics aside. Ends at a barrier so all processes see the files."""
  lead = jax.process_index() == 0
  mcfg, lora_record, tokenizer, mesh = _check_inputs(cfg, workdir, restart=restart)
  rows_sharding = NamedSharding(mesh, P(step_lib.batch_sharding(mesh).spec[1]))
  local = distributed.process_batch_slice(cfg.microbatch, rows_sharding)
  data = data_lib.build(cfg, tokenizer, os.path.join(workdir, "data"), local=local,
                        progress=cfg.train.progress and lead)
  os.makedirs(workdir, exist_ok=True)
  if cfg.train.eval_every and not data.heldout:
    log.warning("no held-out evaluation: the held-out split has fewer than data.batch_size rows")
  if lead:
    mcfg.save(os.path.join(workdir, "config.json"))
    cfg.save(os.path.join(workdir, "train_config.yaml"))
    shutil.copyfile(tokenizer.path, os.path.join(workdir, "tokenizer.model"))
    if lora_record is not None:
      lora_run.check_or_write(workdir, lora_record, write=True)
  if restart and lead:
    _move_aside(os.path.join(workdir, "checkpoints"))
    _move_aside(os.path.join(workdir, "metrics.jsonl"))
  barrier("setup", cfg.train.barrier_timeout_s)
  return _Setup(mcfg, mesh, data)


def _base_params(cfg: TrainConfig, mcfg: MixtralConfig, mesh) -> dict:
  """The model checkpoint's weights as a pure dict, placed on ``mesh`` (LoRA: in the compute dtype, since
  the frozen base is never materialised in fp32)."""
  from mixtral_jax.checkpoint import load  # noqa: PLC0415 - checkpoint I/O only when used
  kwargs = dict(cfg.model.overrides)
  if cfg.lora.enabled:
    kwargs["param_dtype"] = mcfg.dtype
  model = load(cfg.model.checkpoint, mesh=mesh, **kwargs)
  return nnx.state(model, nnx.Param).to_pure_dict()


def _restore_or_init(cfg: TrainConfig, setup: _Setup, ckpt: Checkpointer, abstract_state):
  """(state, resumed): the newest checkpoint in the workdir (the data iterator restored with it), or a
  fresh state from the model checkpoint / a random init. LoRA checkpoints hold the adapters only, so a
  resumed LoRA run takes its frozen base from the model checkpoint as a fresh one does."""
  mcfg, mesh = setup.mcfg, setup.mesh
  restored = ckpt.restore_latest(abstract_state)
  base_params = None  # the starting weights (full training) or the frozen base (LoRA)
  if cfg.model.checkpoint and (restored is None or cfg.lora.enabled):
    base_params = _base_params(cfg, mcfg, mesh)
  if restored is None:
    return step_lib.init_state(mcfg, cfg, mesh, params=base_params), False
  state, data_state = restored
  setup.data.train.restore(data_state)
  if cfg.lora.enabled:
    state = dataclasses.replace(state, base=step_lib.place_base(mcfg, cfg, mesh, base_params))
  return state, True


def _diverged(loss: float, step: int, ckpt: Checkpointer, last_saved: int | None) -> TrainingDiverged:
  """The error for a non-finite loss, after the pending checkpoint has landed (it is the good one)."""
  ckpt.wait()
  good = (f"the last good checkpoint is step {last_saved} in {ckpt.directory} (kept)"
          if last_saved is not None else "no checkpoint was written yet")
  return TrainingDiverged(f"the training loss is {loss} at step {step}; {good}. Lower optimizer.lr, "
                          "raise optimizer.warmup_steps or check the data, then rerun to resume")


def _open_logger(cfg: TrainConfig, workdir: str, setup: _Setup, start: int, resumed: bool) -> MetricsLogger:
  lead = jax.process_index() == 0
  logger = MetricsLogger(workdir, total_steps=cfg.train.steps, start_step=start, progress=cfg.train.progress,
                         enabled=lead, log_every=cfg.train.log_every, print_every=cfg.train.print_every)
  if lead:
    slices = f" ({cfg.train.simulated_slices} simulated slices)" if cfg.train.simulated_slices else ""
    logger.write(f"mixtral-jax train: {workdir} | mesh {format_mesh(setup.mesh)}{slices} | steps {start}->"
                 f"{cfg.train.steps} | batch {cfg.data.batch_size}x{cfg.data.seq_len} | "
                 f"{setup.data.train_rows} train rows" + (" | resumed" if resumed else ""))
  return logger


def _save_and_stop(ckpt: Checkpointer, state, it, logger, step: int, result: RunResult) -> None:
  """SIGTERM: saves this step at once, waits for the write, and marks the run stopped by the signal
  (rerunning the same command resumes from it)."""
  ckpt.save(state, it.state(), force=True)
  ckpt.wait()
  logger.write(f"SIGTERM: saved step {step} in {ckpt.directory}; rerun the same command to resume")
  result.stopped_by_signal = True


def _loop(cfg: TrainConfig, workdir: str, setup: _Setup, ckpt: Checkpointer, state, *, resumed: bool, step_fn,
          eval_fn, global_batch_shape) -> RunResult:
  """Steps from the state's step to ``train.steps``: one jitted step, a finite-loss check, the metrics
  record (throughput, MFU, realised data mixture), held-out evaluation, checkpoints; SIGTERM saves the
  current step and stops cleanly. Closes the data iterator, logger and checkpointer whatever happens."""
  it, eval_batches, bsh = setup.data.train, setup.data.heldout, step_lib.batch_sharding(setup.mesh)
  start = int(state.step)
  dpo = step_lib.is_dpo(cfg)  # a DPO batch_size counts pairs: a chosen and a rejected row each
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * (2 if dpo else 1)
  flops_per_step = train_flops_per_token(setup.mcfg, cfg.data.seq_len, cfg.lora, dpo) * tokens_per_step
  peak = (cfg.train.peak_flops or measure_peak_flops()) * jax.device_count()
  logger = _open_logger(cfg, workdir, setup, start, resumed)
  preempt = _Preemption()
  result = RunResult(start, start, {}, {})
  last_saved = start if resumed else None
  timer, window = Goodput(), ProfileWindow(cfg.train.profile, cfg.train.steps, workdir)
  try:
    t_prev = time.perf_counter()
    for step in range(start + 1, cfg.train.steps + 1):
      window.before(step)
      with timer.phase("data_wait"):
        batch = _device_batch(next(it), bsh, global_batch_shape)
      with timer.phase("compute"):
        state, metrics = step_fn(state, batch)
        metrics = jax.device_get(metrics)
      window.after(step)
      ckpt.check_for_errors()
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise _diverged(loss, step, ckpt, last_saved)
      now = time.perf_counter()
      dt, t_prev = now - t_prev, now
      record = _step_record(metrics, dt, tokens_per_step, (flops_per_step, peak), it.source_tokens)
      result.losses[step] = loss
      if eval_batches and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
        with timer.phase("eval"):
          evaluated = _evaluate(eval_fn, step_lib.eval_params(state), eval_batches, bsh, global_batch_shape)
        record.update(evaluated)
        result.eval_losses[step] = record["eval_loss"]
        t_prev = time.perf_counter()  # evaluation time is not step time
      logger.log(step, {**record, **timer.step_record()})  # it decides what goes to the file and the console
      result.final_step = step
      if preempt.requested:
        _save_and_stop(ckpt, state, it, logger, step, result)
        break
      if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
        with timer.phase("checkpoint"):  # in the next step's record
          ckpt.save(state, it.state(), force=True)
        last_saved = step
    _finish_run(cfg, workdir, ckpt, timer, logger)
  finally:
    window.stop()
    timer.close()
    preempt.restore()
    it.close()
    logger.close()
    ckpt.close()
  return result


def _step_record(metrics, dt: float, tokens_per_step: int, flops, source_tokens: dict) -> dict:
  """One step's record: its metrics, time, throughput, MFU (``flops``: the step's FLOPs and the peak
  FLOP/s of all devices) and the realised data mixture (tokens read from each source so far)."""
  flops_per_step, peak = flops
  return {**metrics, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt, "mfu": flops_per_step / dt / peak,
          **{f"data_tokens/{n}": t for n, t in source_tokens.items()}}


def _finish_run(cfg: TrainConfig, workdir: str, ckpt: Checkpointer, timer: Goodput, logger) -> None:
  """After the last step: waits for the checkpoint writes, meets the other processes, and reports the
  goodput summary (logged, and written to goodput.json by process 0)."""
  with timer.phase("checkpoint"):
    ckpt.wait()
  barrier("done", cfg.train.barrier_timeout_s)
  totals = timer.summary()
  logger.write(summary_line(totals))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "goodput.json"), "w") as f:
      json.dump(totals, f, indent=2)


def _evaluate(eval_fn, params, batches, sharding, global_shape) -> dict[str, float]:
  """``eval_loss`` (and, for DPO, ``eval_accuracy``, ``eval_reward_margin``...): sums over the held-out
  batches divided by their total weight."""
  nll = weight = 0.0
  sums: dict[str, float] = {}
  for b in batches:
    n, w, *extra = eval_fn(params, _device_batch(b, sharding, global_shape))
    nll, weight = nll + float(n), weight + float(w)
    for k, v in (extra[0] if extra else {}).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {"eval_loss": nll / max(weight, 1.0), **{f"eval_{k}": v / max(weight, 1.0) for k, v in sums.items()}}


def configure_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  np.set_printoptions(precision=4, suppress=True)
