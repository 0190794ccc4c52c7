"""A synthetic preference set with a learnable rule: the chosen answer is the correct sum.

Each pair asks ``"What is a+b?"`` (0 <= a, b <= ``max_operand``); ``chosen`` is ``a + b`` and
``rejected`` a wrong sum ``a + b + d`` (d a non-zero offset in [-3, 3], kept >= 0). A DPO run on it should
move its held-out preference accuracy from chance (about 50%: at step 0 the policy equals the reference,
so every reward is 0 and accuracy counts ties as wrong) to near 100%.

Held-out pairs are new (a, b, wrong answer) triples drawn by a different seed; with small operands most
of their prompts also occur in training with other wrong answers, so the rule being tested is "prefer
the correct sum", not arithmetic on unseen numbers.

  python -m mixtral_jax.train.data.synthetic_preference OUT_DIR [--pairs 2000] [--heldout 200]
writes ``OUT_DIR/train.jsonl`` and ``OUT_DIR/heldout.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def sum_pairs(n: int, seed: int, max_operand: int = 9) -> list[dict]:
  """``n`` preference records ``{"prompt", "chosen", "rejected"}`` (module docstring), deterministic."""
  rng = np.random.default_rng(seed)
  records = []
  while len(records) < n:
    a, b = (int(x) for x in rng.integers(0, max_operand + 1, 2))
    d = int(rng.choice([-3, -2, -1, 1, 2, 3]))
    if a + b + d < 0:
      continue
    records.append({"prompt": f"What is {a}+{b}?", "chosen": str(a + b), "rejected": str(a + b + d)})
  return records


def write(out_dir: str, pairs: int = 2000, heldout: int = 200, max_operand: int = 9) -> tuple[str, str]:
  """Writes ``train.jsonl`` (seed 0) and ``heldout.jsonl`` (seed 1) under ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, n, seed in (("train.jsonl", pairs, 0), ("heldout.jsonl", heldout, 1)):
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in sum_pairs(n, seed, max_operand))
    paths.append(path)
  return paths[0], paths[1]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("out_dir")
  p.add_argument("--pairs", type=int, default=2000)
  p.add_argument("--heldout", type=int, default=200)
  p.add_argument("--max-operand", type=int, default=9)
  a = p.parse_args(argv)
  for path in write(a.out_dir, a.pairs, a.heldout, a.max_operand):
    print(path)


if __name__ == "__main__":
  main()
