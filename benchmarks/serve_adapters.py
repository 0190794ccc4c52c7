"""The cost of serving many LoRA adapters at once (``serve --adapter``): one paged decode step and one
prefill chunk of a batch whose rows use different adapters, against the same batch on the base alone.

  python benchmarks/serve_adapters.py [--preset bench-small] [--batch 8] [--rank 16] [--adapters 2]
                                      [--steps 20] [--repeats 3]

A random model of the preset (float32) and ``--adapters`` random adapters of rank ``--rank`` on every
target the server takes (q, k, v, o, and w1, w2, w3 of every expert) are built in this process. Three
engines' paged runners (``PagedRunner``, page size 64) each hold ``--batch`` sequences of a 128-token
prompt and time ``--steps`` decode steps (best of ``--repeats``, after a warm-up step), and a 128-token
prefill chunk of one sequence (best of ``--repeats``; under the last row's adapter):

  base       the plain model (no adapters: today's server);
  bank/base  the model with the bank attached, every row on the base (slot 0);
  bank/mix   the same, rows cycling through the base and each adapter.

Reported: ms per decode step, the ratio to ``base``, and ms per prefill chunk. Greedy, logits only (no
sampling, no HTTP).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

PROMPT, PAGE = 128, 64
TARGETS = ("q", "k", "v", "o", "w1", "w2", "w3")


def random_adapter(cfg, rank: int, seed: int):
  from mixtral_jax.lora import adapters as adapters_lib  # noqa: PLC0415
  from mixtral_jax.lora.factors import Factors  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  out = []
  for t in TARGETS:
    a, b = adapters_lib.shapes(cfg, t, rank)
    L = (cfg.num_hidden_layers,)
    out.append(Factors(t, rng.normal(0, 0.02, L + a).astype(np.float32), rng.normal(0, 0.02, L + b).astype(np.float32),
                       2.0))
  return out


def time_runner(model, adapters, names, batch, steps, repeats):
  """(ms per decode step, ms per prefill chunk) of ``batch`` sequences whose adapters are ``names``."""
  from mixtral_jax.inference.paged_runner import PagedRunner  # noqa: PLC0415
  from mixtral_jax.model import layer_views  # noqa: PLC0415

  graphdef, state = nnx.split(model)
  width = -(-(PROMPT + steps * (repeats + 1) + 8) // PAGE)
  runner = PagedRunner(graphdef, state, model.cfg, num_pages=(batch + repeats) * width + 2, max_batch=batch,
                       max_context=width * PAGE, prefill_chunk=PROMPT, page_size=PAGE, prefix_caching=False,
                       layers=layer_views(model), adapters=adapters)
  rng = np.random.default_rng(0)
  seqs = [runner.admit(i, [1] + rng.integers(100, 30000, PROMPT - 1).tolist(), names[i]) for i in range(batch)]
  for seq in seqs:
    runner.prefill(seq).block_until_ready()  # (the first compiles)
  for seq in seqs:
    runner.append(seq, 5)
  runner.ensure_room(seqs)
  runner.decode(seqs).block_until_ready()  # compile
  for seq in seqs:
    runner.append(seq, 5)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      runner.ensure_room(seqs)
      logits = runner.decode(seqs)
      for seq in seqs:
        runner.append(seq, 5)
    logits.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / steps * 1e3)
  prefill_ms = float("inf")  # compiled above: best of ``repeats`` fresh 128-token sequences
  for i in range(repeats):
    extra = runner.admit(batch + i, [1] + rng.integers(100, 30000, PROMPT - 1).tolist(), names[-1])
    t0 = time.perf_counter()
    runner.prefill(extra).block_until_ready()
    prefill_ms = min(prefill_ms, (time.perf_counter() - t0) * 1e3)
  return best, prefill_ms


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="bench-small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--adapters", type=int, default=2)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  import mixtral_jax  # noqa: PLC0415
  from mixtral_jax.lora import bank as bank_lib  # noqa: PLC0415

  cfg = mixtral_jax.get_config(args.preset, dtype="float32")
  base = mixtral_jax.create_model(cfg, seed=0)
  named = [(f"a{i}", random_adapter(cfg, args.rank, seed=i + 1)) for i in range(args.adapters)]
  bank = bank_lib.build_bank(named, cfg)
  served = bank_lib.attach_bank(base, bank)
  cycle = [None] + list(bank.names)
  runs = {"base": (base, (), [None] * args.batch),
          "bank/base": (served, bank.names, [None] * args.batch),
          "bank/mix": (served, bank.names, [cycle[i % len(cycle)] for i in range(args.batch)])}
  print(f"{args.preset}, batch {args.batch}, {args.adapters} adapters of rank {args.rank} on {','.join(TARGETS)}, "
        f"{jax.devices()[0].platform}", flush=True)
  print("| run | decode ms/step | vs base | prefill ms (128 tokens) |\n|---|---|---|---|")
  ref = None
  for name, (model, adapters, names) in runs.items():
    step, pre = time_runner(model, adapters, names, args.batch, args.steps, args.repeats)
    ref = ref or step
    print(f"| {name} | {step:.2f} | {step / ref:.2f}x | {pre:.1f} |", flush=True)


if __name__ == "__main__":
  main()
