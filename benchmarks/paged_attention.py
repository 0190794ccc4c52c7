"""Paged attention against dense attention over a contiguous cache, for one decode step (T = 1) and one
prefill chunk, at the cache lengths a server meets; plus the grammar mask cost at batch 8.

  python benchmarks/paged_attention.py [--heads 32,8,128] [--batch 8] [--lengths 512,2048,8192]

Per length S: the same B rows of S cached tokens (8x7B's attention shape per layer by default), read
through a shuffled page table (paged, pages of 64, 1 and 4 pages per block) or as a contiguous [B, S]
cache (dense: the whole [B, K, G, T, S] logits). Median of 5 timed calls after one warm-up, one layer.
The paged read gathers pages (a copy per block), so on CPU it is expected to trail the contiguous
read; what it buys is memory: rows hold only the pages they use.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.attn.dense import dense_attention
from mixtral_jax.attn.paged import paged_attention


def _median_ms(fn, *args, reps=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def attention_rows(N, K, H, B, S, T, page_size=64):
  rng = np.random.default_rng(0)
  M = S // page_size
  P = B * M + 1
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16)
  table = (1 + rng.permutation(B * M)).reshape(B, M).astype(np.int32)
  kp = jnp.zeros((P, page_size, K, H), jnp.bfloat16).at[table.reshape(-1)].set(k.reshape(B * M, page_size, K, H))
  vp = jnp.zeros((P, page_size, K, H), jnp.bfloat16).at[table.reshape(-1)].set(v.reshape(B * M, page_size, K, H))
  q_pos = np.broadcast_to(np.arange(S - T, S, dtype=np.int32), (B, T))
  kv_len = np.full(B, S, np.int32)
  kv_pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
  row = {"S": S, "T": T}
  row["dense_ms"] = _median_ms(jax.jit(dense_attention), q, k, v, q_pos, kv_pos)
  for ppb in (1, 4):
    fn = jax.jit(functools.partial(paged_attention, pages_per_block=ppb))
    row[f"paged{ppb}_ms"] = _median_ms(fn, q, kp, vp, table, q_pos, kv_len)
  return row


def grammar_fill_ms(batch=8, steps=30):
  import llguidance  # noqa: F401  (only for this figure)

  from mixtral_jax.inference.grammar import MaskBatch, StructuredOutput
  from mixtral_jax.tokenizer import Tokenizer

  so = StructuredOutput(Tokenizer.load("v1"))
  schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                                             "n": {"type": "integer"}}, "required": ["name", "tags", "n"],
            "additionalProperties": False}
  grammar = so.compile({"type": "json_schema", "json_schema": {"schema": schema}})
  matchers = [so.matcher(grammar) for _ in range(batch)]
  masks, rng, spent = MaskBatch(batch, so.vocab_size), np.random.default_rng(0), []
  for _ in range(steps):
    t0 = time.perf_counter()
    bits = masks.fill([None if m.is_stopped() else m for m in matchers])
    spent.append(time.perf_counter() - t0)
    ok = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :so.vocab_size].astype(bool)
    for b, m in enumerate(matchers):
      if not m.is_stopped():
        m.consume_token(int(rng.choice(np.nonzero(ok[b])[0])))
  return 1e3 * float(np.median(spent))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--heads", default="32,8,128", help="N,K,H")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--lengths", default="512,2048,8192")
  args = ap.parse_args()
  N, K, H = (int(x) for x in args.heads.split(","))
  print(f"device {jax.devices()[0].device_kind}; B={args.batch} N={N} K={K} H={H}, bf16, one layer, median of 5")
  for S in (int(x) for x in args.lengths.split(",")):
    for T in (1, 64):
      r = attention_rows(N, K, H, args.batch, S, T)
      print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
  print(f"grammar mask fill, batch 8, median per step: {grammar_fill_ms():.3f} ms")


if __name__ == "__main__":
  main()
