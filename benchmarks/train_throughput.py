"""Train-step throughput: our jitted step vs transformers' MixtralForCausalLM + torch.optim.AdamW.

Same config in both (the issue's bench-small: V 32000, D 512, L 4, 8 heads / 2 kv heads, F 1792, 8 experts,
top-2; fp32; batch 8 x 256 tokens), the load-balancing loss included in both, compile / warm-up steps
excluded, medians of timed steps. Also measures a large fp32 matmul in JAX, the "peak" of CPU MFU.

  python benchmarks/train_throughput.py [--steps 6] [--batch 8] [--seq 256] [--ce-chunk 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import get_config
from mixtral_jax.sharding.mesh import make_mesh
from mixtral_jax.train import step as step_lib
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.metrics import measure_peak_flops, train_flops_per_token


def batch_arrays(cfg, B, T, seed=0):
  ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  return ids[:, :-1], ids[:, 1:]


def ours_step(cfg, args):
  """A zero-argument callable running one of our train steps to completion."""
  train = TrainConfig().override({"data.batch_size": args.batch, "data.seq_len": args.seq,
                                  "loss.ce_chunk": args.ce_chunk, "train.steps": 1000})
  mesh = make_mesh(None, devices=jax.devices()[:1])
  step_fn, _, _ = step_lib.build_train_step(cfg, train, mesh)
  state = step_lib.init_state(cfg, train, mesh)
  inputs, targets = batch_arrays(cfg, args.batch, args.seq)
  shape = (1, args.batch, args.seq)
  batch = {"inputs": inputs.reshape(shape), "targets": targets.reshape(shape),
           "weights": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
           "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy()}
  batch = jax.device_put(batch, step_lib.batch_sharding(mesh))
  holder = {"state": state}

  def run():
    holder["state"], metrics = step_fn(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
  return run


def transformers_step(cfg, args):
  """A zero-argument callable running one transformers + torch AdamW train step."""
  import torch
  import transformers

  torch.manual_seed(0)
  hf_cfg = transformers.MixtralConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "torch_dtype", "output_router_logits")},
                                      output_router_logits=True)
  model = transformers.MixtralForCausalLM(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  inputs, targets = batch_arrays(cfg, args.batch, args.seq)
  ids = torch.tensor(np.concatenate([inputs, targets[:, -1:]], axis=1), dtype=torch.long)

  def run():
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])  # labels shift inside; aux loss added
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return run


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--ce-chunk", type=int, default=64)
  p.add_argument("--skip-transformers", action="store_true")
  args = p.parse_args()
  cfg = get_config("bench-small")
  tokens = args.batch * args.seq
  flops = train_flops_per_token(cfg, args.seq) * tokens

  peak = measure_peak_flops(2048, repeats=7)
  print(f"device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s); "
        f"fp32 2048^3 matmul: {peak / 1e9:.0f} GFLOP/s")
  runners = {"mixtral-jax": ours_step(cfg, args)}
  if not args.skip_transformers:
    runners["transformers"] = transformers_step(cfg, args)
  times = {name: [] for name in runners}
  for i in range(args.warmup + args.steps):  # interleaved, so load changes on a shared machine hit both
    for name, fn in runners.items():
      t = timed(fn)
      if i >= args.warmup:
        times[name].append(t)
  med = {name: statistics.median(ts) for name, ts in times.items()}
  for name, t in med.items():
    print(f"{name:13s}: {t:.3f} s/step  {tokens / t:8.0f} tokens/s  {flops / t / 1e9:5.0f} GFLOP/s model  "
          f"MFU vs matmul {flops / t / peak:.0%}  (steps: {', '.join(f'{x:.2f}' for x in times[name])})")
  if "transformers" in med:
    print(f"ratio (ours / transformers tokens/s): {med['transformers'] / med['mixtral-jax']:.2f}x")
  print(f"fp32 2048^3 matmul after the runs: {measure_peak_flops(2048, repeats=7) / 1e9:.0f} GFLOP/s")

if __name__ == "__main__":
  main()
