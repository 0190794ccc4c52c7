"""Per-step metrics: ``WORKDIR/metrics.jsonl`` (one JSON object per step), TensorBoard event files
(tensorboardX), a tqdm progress bar, and the model-FLOPs utilisation estimate."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.params import param_counts


def train_flops_per_token(cfg: MixtralConfig, seq_len: int) -> float:
  """Model FLOPs of one trained token (forward + backward = 3x forward), PaLM-style:
  6 * (active parameters that multiply: all but the embedding table) + 6 * L * N * H * T for the
  causal attention scores and values (half of PaLM's 12 * L * N * H * T, since half the pairs are masked).
  """
  _, active = param_counts(cfg)
  matmul_params = active - cfg.vocab_size * cfg.hidden_size
  attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_size * seq_len
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
  """Writes each step's metrics to metrics.jsonl and TensorBoard, and drives the progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress: bool, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 - heavy import, only when logging
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.bar = None
    if enabled and progress:
      from tqdm import tqdm  # noqa: PLC0415
      self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def log(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
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
    if self.bar is not None:
      self.bar.set_postfix_str(f"loss {record['loss']:.3f} tok/s {record.get('tokens_per_s', 0):,.0f}"
                               + (f" eval {record['eval_loss']:.3f}" if "eval_loss" in record else ""))
      self.bar.update(step - self.bar.n)

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


def _plain(v):
  a = np.asarray(v)
  if a.ndim == 0:
    x = a.item()
    return x if isinstance(x, int) else float(x)
  return np.round(a.astype(np.float64), 6).tolist()
