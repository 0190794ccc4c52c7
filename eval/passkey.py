"""Passkey retrieval (Mohtashami & Jaggi 2023; the Mixtral paper's §3.2).

A prompt is a fixed header, the usual filler ("The grass is green. The sky is blue. ...") repeated to
fill the requested length in tokens, a random 5-digit key placed at a relative depth d in the filler,
and a closing question::

  HEADER  FILLER * n_before  "The pass key is 68127. Remember it. 68127 is the pass key."  FILLER * n_after
  "What is the pass key? The pass key is"

``n_before = round(d * n)`` of the ``n`` filler units that fit, so depth 0 puts the key right after the
header and depth 1 right before the question. The model's greedy answer is scored by exact match: its
first run of digits must equal the key.

Functions here are pure (tokenizer in, token ids and positions out) so that tests can check where the
key lands; :func:`run_passkey` generates the answers with :func:`mixtral_jax.generate` (the model's own
attention path, which the config picks for long prompts) and tallies accuracy per (length, depth).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
  """One prompt: its text and token ids (with BOS), the key, and where the key's line starts.

  ``key_token`` is the index in ``ids`` of the first token of the key line; ``depth`` is the depth asked
  for and ``actual_depth`` the one achieved (filler units before the key / all filler units)."""
  text: str
  ids: list[int]
  key: str
  depth: float
  actual_depth: float
  key_token: int


def _join(parts: Sequence[str]) -> str:
  return " ".join(p for p in parts if p)


def make_prompt(tokenizer, length: int, depth: float, key: str, *, answer: bool = False) -> PasskeyPrompt:
  """The longest passkey prompt of at most ``length`` tokens (BOS included) with ``key`` at ``depth``.

  ``answer`` appends " {key}." (the training form of the text). Raises ValueError when even a prompt
  without filler does not fit."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
  key_line = KEY_LINE.format(key=key)
  tail = QUESTION + (f" {key}." if answer else "")
  unit = len(tokenizer.encode(FILLER + " ", bos=False)) - 1  # tokens one more filler sentence adds
  bare = len(tokenizer.encode(_join([HEADER, key_line, tail])))
  if bare > length:
    raise ValueError(f"a passkey prompt needs at least {bare} tokens; length {length} is too short")
  n = max((length - bare) // max(unit, 1) + 1, 0)
  while True:  # the estimate may be one or two units long at sentence joins: shrink until it fits
    before = round(depth * n)
    text = _join([HEADER, " ".join([FILLER] * before), key_line, " ".join([FILLER] * (n - before)), tail])
    ids = tokenizer.encode(text)
    if len(ids) <= length or n == 0:
      break
    n -= 1
  prefix = _join([HEADER, " ".join([FILLER] * before)])
  key_token = len(tokenizer.encode(prefix))  # the key line starts right after the prefix's tokens
  return PasskeyPrompt(text, ids, key, depth, before / n if n else 0.0, key_token)


def random_key(rng: np.random.Generator) -> str:
  return str(int(rng.integers(10_000, 100_000)))


def score_answer(answer: str, key: str) -> bool:
  """Exact match: the first run of digits in the answer equals the key."""
  found = re.search(r"\d+", answer)
  return found is not None and found.group(0) == key


def parse_length(text: str) -> int:
  """``1k`` -> 1024, ``32k`` -> 32768, ``500`` -> 500."""
  t = text.strip().lower()
  try:
    return int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
  except ValueError:
    raise ValueError(f"cannot read length {text!r}; write tokens as 512, 1k, 32k") from None


def _pad_to(tokenizer, text: str, total: int, repeat: str = "") -> str | None:
  """``text`` plus trailing filler words so that ``<s> text </s>`` is exactly ``total`` tokens (None if
  no cut of the filler lands on it). A non-empty ``repeat`` is first appended as many whole times as fit
  (the question and its answer again: more retrieval signal per row than filler)."""
  if repeat:
    while len(tokenizer.encode(text + " " + repeat, bos=True, eos=True)) <= total:
      text += " " + repeat
  filler_ids = tokenizer.encode(" ".join([FILLER] * (total // 4 + 2)), bos=False)
  for r in range(0, len(filler_ids)):
    padded = text + (" " + tokenizer.decode(filler_ids[:r]) if r else "")
    n = len(tokenizer.encode(padded, bos=True, eos=True))
    if n == total:
      return padded
    if n > total:
      return None
  return None


def write_training_text(tokenizer, out_dir: str, count: int, min_len: int, max_len: int, seed: int = 0,
                        row: int | None = None, pad: str = "filler") -> list[str]:
  """``count`` passkey documents with their answers, one per ``.txt`` file in ``out_dir``, of random
  lengths in [min_len, max_len] tokens and random depths: plain text for a run config's data.paths.

  ``row``: pad every document with filler after its answer to exactly ``row`` tokens with BOS and EOS.
  With ``row`` equal to the run's ``data.seq_len``, the training rows (windows of ``seq_len`` tokens
  over the concatenated documents) are then exactly the documents: no question is cut off from its key.
  ``pad``: what fills the row after the answer: ``filler`` sentences, or ``question`` (the question and
  its answer repeated while they fit, then filler): the copy of the key is then learnt from several
  answers per row rather than one, which took ``tiny`` off its no-copy plateau (though the repeats' fixed
  spacing also taught it a copy at a fixed distance: docs/benchmarks.md, "Evaluation (issue 12)")."""
  if pad not in ("filler", "question"):
    raise ValueError(f"passkey padding must be filler or question, got {pad!r}")
  import os  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  while len(paths) < count:
    p = make_prompt(tokenizer, int(rng.integers(min_len, max_len + 1)), float(rng.uniform()), random_key(rng),
                    answer=True)
    repeat = f"{QUESTION} {p.key}." if pad == "question" else ""
    text = p.text if row is None else _pad_to(tokenizer, p.text, row, repeat)
    if text is None:
      continue
    path = os.path.join(out_dir, f"passkey-{len(paths):05d}.txt")
    with open(path, "w") as f:
      f.write(text)
    paths.append(path)
  return paths


def run_passkey(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, *, seed: int = 0,
                batch_size: int = 8, mesh=None, progress: bool = True, max_new_tokens: int = 8) -> dict:
  """Greedy answers for ``trials`` random keys at every (length, depth); returns the result dict
  (``accuracy[length][depth]``, every answer, and the chance level of guessing a 5-digit key)."""
  from mixtral_jax.generate import generate  # noqa: PLC0415
  from tqdm import tqdm  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  jobs = [(L, d, make_prompt(tokenizer, L, d, random_key(rng))) for L in lengths for d in depths for _ in range(trials)]
  answers: list[str] = []
  bar = tqdm(total=len(jobs), desc="passkey", unit="prompt", disable=not progress, dynamic_ncols=True)
  for start in range(0, len(jobs), batch_size):  # jobs are grouped by length: one shape bucket per batch
    chunk = jobs[start:start + batch_size]
    out = generate(model, [p.ids for _, _, p in chunk], max_new_tokens, tokenizer=tokenizer, mesh=mesh)
    answers += out.texts
    bar.update(len(chunk))
  bar.close()
  records, acc = [], {}
  for (L, d, p), a in zip(jobs, answers):
    ok = score_answer(a, p.key)
    records.append({"length": L, "depth": d, "tokens": len(p.ids), "key": p.key, "answer": a, "correct": ok})
    acc.setdefault(str(L), {}).setdefault(f"{d:g}", []).append(ok)
  accuracy = {L: {d: float(np.mean(v)) for d, v in row.items()} for L, row in acc.items()}
  overall = float(np.mean([r["correct"] for r in records]))
  return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": accuracy,
          "overall": overall, "chance": 1 / 90_000, "records": records}
