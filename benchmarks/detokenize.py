"""Per-token text bookkeeping of a generated row: incremental detokenization against re-decoding the
whole reply after every token, in one run.

  python benchmarks/detokenize.py [--tokens 2000] [--tokenizer v1] [--repeats 5]

The reply is ``--tokens`` tokens of real text (the Python standard library's source, encoded with the
bundled Mistral tokenizer), pushed one token at a time through ``generate``'s row (``Row``: decode,
stop-string search, stream delta) with two stop strings that never match. The alternative is the same
row as it was before: ``tokenizer.decode(all tokens)`` and a stop search over the whole text per token.
Reported: the median total time per reply of each, and their ratio.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time


class FullRedecodeRow:
  """The row before incremental decoding: O(n) work per token, O(n^2) per reply."""

  def __init__(self, tokenizer, stop):
    self.tokenizer, self.stop, self.tokens, self.text, self.streamed = tokenizer, stop, [], "", 0
    self.holdback = max((len(s) for s in stop), default=1) - 1

  def push(self, token, is_last_step):
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens)
    if not text.endswith("\ufffd"):
      self.text = text
    for s in self.stop:
      if self.text.find(s) >= 0:
        raise AssertionError("the benchmark's stop strings never match")
    delta = self.text[self.streamed:max(self.streamed, len(self.text) - self.holdback)]
    self.streamed += len(delta)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=2000)
  p.add_argument("--tokenizer", default="v1")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()

  import json as corpus_module  # any standard-library module's source is real text

  from mixtral_jax.inference.row import Row
  from mixtral_jax.tokenizer import Tokenizer

  tok = Tokenizer.load(args.tokenizer)
  tokens = tok.encode(inspect.getsource(corpus_module.decoder) + inspect.getsource(corpus_module.encoder),
                      bos=False)
  while len(tokens) < args.tokens:
    tokens = tokens + tokens
  tokens = tokens[:args.tokens]
  stop = ("<|never|>", "\n\n\n\n\n")

  def reply(make):
    row = make()
    t0 = time.perf_counter()
    for i, t in enumerate(tokens):
      row.push(t, is_last_step=i + 1 == len(tokens) + 1)
    return time.perf_counter() - t0, row

  new = lambda: Row(0, tok, frozenset(), stop, None)  # noqa: E731
  old = lambda: FullRedecodeRow(tok, stop)  # noqa: E731
  times = {"incremental": [], "full re-decode": []}
  for _ in range(args.repeats):
    dt, row_new = reply(new)
    times["incremental"].append(dt)
    dt, row_old = reply(old)
    times["full re-decode"].append(dt)
  assert row_new.text == row_old.text == tok.decode(tokens)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"{args.tokens}-token reply ({args.tokenizer} tokenizer, {len(row_new.text)} characters), median of "
        f"{args.repeats}:")
  for k, v in med.items():
    print(f"  {k:15s} {v * 1e3:9.1f} ms per reply, {v / args.tokens * 1e6:8.1f} us per token")
  print(f"  speed-up {med['full re-decode'] / med['incremental']:.1f}x")


if __name__ == "__main__":
  main()
