"""Per-step metrics: ``WORKDIR/metrics.jsonl`` (one JSON object per step), TensorBoard event files
(tensorboardX), what the console shows, the run's summary, and the model-FLOPs utilisation estimate.

Console: on a terminal (stdout and stderr both TTYs, ``train.progress`` on) a tqdm bar; otherwise (a log
file, a pipe, a batch job) one plain line every ``train.print_every`` steps. Either way each held-out
evaluation prints its own line, which nothing overwrites.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.params import param_counts


def train_flops_per_token(cfg: MixtralConfig, seq_len: int, lora=None, dpo: bool = False) -> float:
  """Model FLOPs of one trained token (forward + backward = 3x forward), PaLM-style:
  6 * (active parameters that multiply: all but the embedding table) + 6 * L * N * H * T for the
  causal attention scores and values (half of PaLM's 12 * L * N * H * T, since half the pairs are masked).

  LoRA (``lora``, an enabled ``LoraSection``): a frozen weight has no weight-gradient matmul, only the
  forward and the input gradient, so the base counts 4 per parameter instead of 6; the adapters a token
  uses (``lora.spec.adapter_params(active=True)``) count 6; the attention scores still 6 (both their
  operands need gradients). Remat's recomputation is not model FLOPs and is never counted.

  DPO (``dpo``; per token of a chosen or rejected row): the LoRA step's count plus the reference forward
  (adapters off, no backward): 2 per frozen parameter and a third of the scores' 6.
  """
  _, active = param_counts(cfg)
  matmul_params = active - cfg.vocab_size * cfg.hidden_size
  attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_size * seq_len
  if lora is not None and lora.enabled:
    from mixtral_jax.lora.spec import adapter_params  # noqa: PLC0415
    reference = 2.0 * matmul_params + attn / 3 if dpo else 0.0
    return 4.0 * matmul_params + 6.0 * adapter_params(cfg, lora, active=True) + attn + reference
  if dpo:
    raise ValueError("DPO takes its reference from the base with the adapters off: set lora.rank (e.g. 16)")
  return 6.0 * matmul_params + attn


def measure_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of one device on a large float32 matmul (the "peak" that CPU MFU is measured against)."""
  dev = jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


class MetricsLogger:
  """Writes each step's metrics to metrics.jsonl (every ``log_every`` steps, each evaluation and the last
  step) and TensorBoard, and shows progress on the console (see the module docstring)."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress: bool, enabled: bool = True,
               log_every: int = 1, print_every: int = 10):
    self.enabled = enabled
    self.total_steps, self.start_step = total_steps, start_step
    self.log_every, self.print_every = max(log_every, 1), max(print_every, 1)
    if enabled:  # a resumed run redoes the steps after its checkpoint: drop their old records first
      truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start_step)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self.divergence = DivergenceWatch()
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 - heavy import, only when logging
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.use_bar = enabled and progress and sys.stdout.isatty() and sys.stderr.isatty()
    self.bar = None  # made at the first step, so that lines written before it (the header) stay whole

  def log(self, step: int, metrics: dict) -> None:
    """Called every step with that step's metrics (``eval_loss`` among them at an evaluation)."""
    if not self.enabled:
      return
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    warning = self.divergence.update(step, record.get("loss"))
    if warning:
      self.write(warning)
    last = step == self.total_steps
    if step % self.log_every == 0 or "eval_loss" in record or last:
      self._save(step, record)
    if self.use_bar:
      if self.bar is None:
        from tqdm import tqdm  # noqa: PLC0415
        self.bar = tqdm(total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True)
      self.bar.set_postfix_str(f"loss {record['loss']:.3f} tok/s {record.get('tokens_per_s', 0):,.0f}", refresh=False)
      self.bar.update(step - self.bar.n)
    elif step % self.print_every == 0 or last or step == self.start_step + 1:
      self.write(step_line(step, self.total_steps, record, first=step == self.start_step + 1))
    if "eval_loss" in record:
      self.write(f"step {step}/{self.total_steps}: held-out loss {record['eval_loss']:.4f}")

  def _save(self, step: int, record: dict) -> None:
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    for k, v in record.items():
      if k == "step":
        continue
      if k == "expert_load":
        for layer, row in enumerate(v):
          self.tb.add_scalars(f"expert_load/layer{layer}", {f"e{e}": x for e, x in enumerate(row)}, step)
      elif isinstance(v, list):
        for i, x in enumerate(v):
          self.tb.add_scalar(f"{k}/layer{i}", x, step)
      elif isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, step)

  def write(self, message: str) -> None:
    if self.bar is not None:
      self.bar.write(message)
    elif self.enabled:
      print(message, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()


def truncate_metrics(path: str, step: int) -> int:
  """Cuts ``metrics.jsonl`` back to the records of steps <= ``step`` (the step a run resumes from), so
  the steps it redoes are not listed twice; a torn last line goes too. Rewritten through a temporary
  file renamed over the old one. Returns the number of records dropped."""
  try:
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return 0
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) == len(lines):
    return 0
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  return len(lines) - len(kept)


class DivergenceWatch:
  """Warns (once per excursion) when the training loss climbs well above its running minimum: above
  ``factor`` x the minimum and ``margin`` nats over it, for ``patience`` consecutive logged steps. A
  loss going from 10 to 260 is a diverging run even while it stays finite."""

  def __init__(self, factor: float = 1.5, margin: float = 1.0, patience: int = 3):
    self.factor, self.margin, self.patience = factor, margin, patience
    self.best, self.above, self.warned = math.inf, 0, False

  def update(self, step: int, loss) -> str | None:
    if loss is None or not math.isfinite(loss):
      return None
    if loss > self.best * self.factor and loss > self.best + self.margin:
      self.above += 1
    else:
      self.above, self.warned = 0, False
    self.best = min(self.best, loss)
    if self.above >= self.patience and not self.warned:
      self.warned = True
      return (f"warning: the loss may be diverging: {loss:.4f} at step {step} against a minimum of "
              f"{self.best:.4f}; consider a lower optimizer.lr or more optimizer.warmup_steps")
    return None


def step_line(step: int, total: int, record: dict, first: bool = False) -> str:
  line = f"step {step}/{total}: loss {record['loss']:.4f}"
  if first and "step_time_s" in record:
    line += f", {record['step_time_s']:.1f} s with compilation"
  elif "step_time_s" in record:
    line += f", {record['step_time_s']:.2f} s/step, {record.get('tokens_per_s', 0):,.0f} tok/s"
  return line


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``WORKDIR/metrics.jsonl`` in step order, the newest record of a step winning (a run
  resumed from a checkpoint repeats the steps after it); a torn last line (a killed run) is skipped."""
  by_step: dict[int, dict] = {}
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
          by_step[record["step"]] = record
  except FileNotFoundError:
    return []
  return [by_step[k] for k in sorted(by_step)]


def summary(records: list[dict]) -> str:
  """``done: step N, loss X, held-out loss A (step i) -> B (step j)`` over the whole run's records."""
  if not records:
    return "done: no steps taken"
  out = f"done: step {records[-1]['step']}"
  if "loss" in records[-1]:
    out += f", loss {records[-1]['loss']:.4f}"
  evals = [r for r in records if "eval_loss" in r]
  if evals:
    first, final = evals[0], evals[-1]
    out += f", held-out loss {first['eval_loss']:.4f} (step {first['step']})"
    if final is not first:
      out += f" -> {final['eval_loss']:.4f} (step {final['step']})"
  return out


def _plain(v):
  a = np.asarray(v)
  if a.ndim == 0:
    x = a.item()
    return x if isinstance(x, int) else float(x)
  return np.round(a.astype(np.float64), 6).tolist()
