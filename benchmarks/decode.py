"""Decode throughput: mixtral_jax.generate against transformers' generate, same weights, fp32, CPU.

  python benchmarks/decode.py [--batches 1 8] [--prompt 128] [--new 128] [--repeats 3]

Config bench-small (V 32000, D 512, L 4, 8/2 heads, F 1792, E 8, k 2), random weights built by
transformers, saved as safetensors and loaded with ``mixtral_jax.from_pretrained``. Greedy, no EOS.

Decode time = time(generate with ``--new`` tokens) - time(generate with 1 token), so prefill and the
first token are excluded; decode tokens/s = batch * (new - 1) / decode time. After a warm-up run of
each (which compiles), the ``--repeats`` rounds run both libraries round-robin, so that a shared
machine's load hits both alike; the figures are medians over rounds (the ratio is the median of the
per-round ratios). At batch 1 the script also reports the fraction of the memory-bandwidth limit:
tokens/s against copy bandwidth / active weight bytes per token, where the bandwidth is that of a
large array copy (read + write bytes / time) measured in every round and the active bytes are every
weight a token reads (attention, router, k of E experts per layer, the LM head, one embedding row).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import mixtral_jax  # noqa: E402
from mixtral_jax.generate import generate  # noqa: E402

BENCH = dict(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


class CopyBandwidth:
  """STREAM-style copy bandwidth: (read + write bytes) / time of copying a large float32 array into a
  donated, already-touched buffer (a fresh output buffer would time page faults, not memory)."""

  def __init__(self, nbytes=1 << 29):
    self.nbytes = nbytes
    self.src = jnp.arange(nbytes // 4, dtype=jnp.float32)
    self.copy = jax.jit(lambda s, d: jax.lax.dynamic_update_slice(d, s, (0,)), donate_argnums=1)
    self.dst = self.copy(self.src, jnp.zeros_like(self.src))

  def __call__(self, repeats=3) -> float:
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      self.dst = self.copy(self.src, self.dst)
      self.dst.block_until_ready()
      times.append(time.perf_counter() - t)
    return 2 * self.nbytes / statistics.median(times)


def active_weight_bytes(cfg) -> int:
  D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
  N, K, H, E, k = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, cfg.num_local_experts, \
      cfg.num_experts_per_tok
  per_layer = D * N * H * 2 + D * K * H * 2 + D * E + k * 3 * D * F + 2 * D
  return 4 * (L * per_layer + D * V + D + D)  # layers, LM head, one embedding row, final norm


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  from reference import hf_model, save_hf  # tests/reference.py: random transformers Mixtral
  hf = hf_model(seed=0, router_scale=1.0, **BENCH)
  hf.generation_config.eos_token_id = None
  with tempfile.TemporaryDirectory() as tmp:
    model = mixtral_jax.from_pretrained(save_hf(hf, os.path.join(tmp, "bench-small")))
  cfg = model.cfg
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), prompt {args.prompt}, new {args.new}, repeats {args.repeats}")

  bandwidth = CopyBandwidth() if 1 in args.batches else None
  nbytes = active_weight_bytes(cfg)
  for B in args.batches:
    prompts = np.random.RandomState(B).randint(3, cfg.vocab_size, (B, args.prompt))

    def ours(n):
      return generate(model, prompts.tolist(), n, eos_id=None)

    def theirs(n):
      with torch.no_grad():
        return hf.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    same = ours(args.new).tokens == theirs(args.new)[:, args.prompt:].tolist()
    for fn in (ours, theirs):
      fn(1)  # warm-up (compiles)
    rates = {"mixtral_jax": [], "transformers": []}
    full = {"mixtral_jax": [], "transformers": []}
    fractions = []
    for _ in range(args.repeats):  # round-robin: both libraries see the same machine load
      for name, fn in (("mixtral_jax", ours), ("transformers", theirs)):
        t_full, t_first = timed(lambda: fn(args.new)), timed(lambda: fn(1))
        rates[name].append(B * (args.new - 1) / (t_full - t_first))
        full[name].append(t_full)
      if B == 1:
        fractions.append(rates["mixtral_jax"][-1] / (bandwidth() / nbytes))
    for name in rates:
      print(f"batch {B}: {name:13s} decode {statistics.median(rates[name]):8.1f} tokens/s  (generate "
            f"{statistics.median(full[name]):.3f} s; rounds: {' '.join(f'{r:.1f}' for r in rates[name])})")
    ratios = [a / b for a, b in zip(rates["mixtral_jax"], rates["transformers"])]
    print(f"batch {B}: ratio mixtral_jax / transformers = {statistics.median(ratios):.2f}x (rounds: "
          f"{' '.join(f'{r:.2f}' for r in ratios)}); greedy tokens identical: {same}")
    if B == 1:
      bw = bandwidth()
      print(f"batch 1: copy bandwidth {bw / 1e9:.1f} GB/s, active weights {nbytes / 1e6:.1f} MB/token -> limit "
            f"{bw / nbytes:.1f} tokens/s; mixtral_jax reaches {statistics.median(fractions):.0%} of it (median of "
            f"per-round fractions: {' '.join(f'{f:.0%}' for f in fractions)})")


if __name__ == "__main__":
  main()
