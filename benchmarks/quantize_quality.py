"""int8 weight-only quantization quality on a trained model: held-out perplexity and top-1 agreement.

  mixtral-jax train --config tiny-pretrain --workdir runs/tiny      # ~7 min on 2 CPU cores
  python benchmarks/quantize_quality.py --run runs/tiny [--rows 32]

Scores the run's own held-out rows (the split its train config defines) with the model as trained
(float32) and with ``mixtral_jax.inference.quantize.quantize`` applied, through the same scoring code
(``mixtral_jax.eval.token_logprobs``). Prints both perplexities, their relative difference (target:
within 1%), the share of positions whose argmax token agrees, and the weight bytes of both.
"""

from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
import numpy as np

import mixtral_jax
from mixtral_jax.eval.scoring import _logprobs
from mixtral_jax.inference.quantize import quantize, weight_bytes
from mixtral_jax.train import data as data_lib
from mixtral_jax.train.config import load_config
from mixtral_jax.tokenizer import Tokenizer
from flax import nnx


@nnx.jit
def _argmax(model, ids_BT, mask_BT):
  return jnp.argmax(model(ids_BT, attention_mask=mask_BT), axis=-1)


def score(model, rows):
  """(perplexity, argmax tokens [N, T]) over the rows, batches of 8."""
  total, count, tops = 0.0, 0, []
  for i in range(0, len(rows), 8):
    ids = jnp.asarray(np.stack(rows[i:i + 8]))
    mask = jnp.ones_like(ids)
    lp, _, valid = _logprobs(model, ids, mask)
    total += float(np.sum(np.asarray(lp), dtype=np.float64))
    count += int(np.sum(np.asarray(valid)))
    tops.append(np.asarray(_argmax(model, ids, mask))[:, :-1])
  return float(np.exp(-total / count)), np.concatenate(tops)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", required=True, help="a training run directory (train_config.yaml, checkpoints)")
  p.add_argument("--rows", type=int, default=32, help="held-out rows to score")
  args = p.parse_args()
  cfg = load_config(os.path.join(args.run, "train_config.yaml"))
  tokenizer = Tokenizer.load(cfg.data.tokenizer)
  _, held = data_lib.build_rows(cfg, tokenizer, os.path.join(args.run, "data"))
  # Each row as one plain sequence of T+1 tokens (documents packed in a row attend across their
  # boundary here; the same for both models, so the comparison is unaffected).
  rows = [np.concatenate([r["inputs"], r["targets"][-1:]]).astype(np.int32)
          for r in (held.row(i) for i in range(min(args.rows, len(held))))]
  model = mixtral_jax.from_pretrained(args.run)
  bytes_f = weight_bytes(model)
  ppl_f, top_f = score(model, rows)
  quantize(model)
  ppl_q, top_q = score(model, rows)
  n = sum(r.size - 1 for r in rows)
  print(f"held-out rows {len(rows)} x {rows[0].size} tokens ({n} predictions), run {args.run}")
  print(f"perplexity float32 {ppl_f:.4f}  int8 {ppl_q:.4f}  relative {100 * (ppl_q / ppl_f - 1):+.3f}%")
  print(f"top-1 agreement {100 * np.mean(top_f == top_q):.2f}%")
  print(f"weight bytes float32 {bytes_f / 2**20:.1f} MiB  int8 {weight_bytes(model) / 2**20:.1f} MiB")


if __name__ == "__main__":
  main()
