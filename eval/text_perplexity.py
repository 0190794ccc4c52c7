"""Perplexity of texts: strided over whole texts (with bits per byte), and against context length.

Strided (Hugging Face's recipe for fixed-length models): windows of ``window`` tokens start every
``stride`` tokens; each window scores only the tokens that no earlier window scored, given everything
before them in the window. Over all texts: perplexity = exp(total NLL / tokens scored) and bits per
byte = total NLL / ln 2 / UTF-8 bytes of the texts (comparable across tokenizers).

Against context length (the Mixtral paper's long-range perplexity figure): for each text, the same
last ``target_tokens`` tokens are scored given windows of c tokens that end at the text's end, for
every c in ``context_lengths`` (the window includes the targets). A model that uses its context has a
mean NLL that falls as c grows. Texts shorter than the longest window are left out (and named).
"""

from __future__ import annotations

import math
import os
import sysconfig
from collections.abc import Sequence

import numpy as np

from .batching import score_sequences

DEFAULT_FILES = ("argparse.py", "difflib.py", "inspect.py", "typing.py", "_pydecimal.py", "pathlib.py")


def default_texts() -> dict[str, str]:
  """Long standard-library source files (every machine has them), by name."""
  root = sysconfig.get_paths()["stdlib"]
  out = {}
  for f in DEFAULT_FILES:
    p = os.path.join(root, f)
    if os.path.isfile(p):
      with open(p, encoding="utf-8") as fh:
        out[f] = fh.read()
  return out


def read_texts(paths: Sequence[str]) -> dict[str, str]:
  out = {}
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"text file {p} does not exist")
    with open(p, encoding="utf-8", errors="replace") as fh:
      text = fh.read()
    if not text.strip():
      raise ValueError(f"text file {p} is empty; give files with text in them")
    out[p] = text
  return out


def strided(model, tokenizer, texts: dict[str, str], *, window: int, stride: int, batch_size: int = 8,
            mesh=None, bar=None) -> dict:
  """{"perplexity", "bits_per_byte", "tokens", "bytes", "window", "stride"} over all ``texts``."""
  if not 0 < stride <= window:
    raise ValueError(f"stride must be in (0, window={window}], got {stride}")
  seqs, keep = [], []
  n_bytes = 0
  for text in texts.values():
    ids = tokenizer.encode(text)
    n_bytes += len(text.encode("utf-8"))
    scored_to = 1  # token 0 (BOS) is never predicted
    for begin in range(0, max(len(ids) - 1, 1), stride):
      end = min(begin + window, len(ids))
      if end <= scored_to:
        continue
      seqs.append(ids[begin:end])
      keep.append(end - scored_to)
      scored_to = end
      if end == len(ids):
        break
  scored = score_sequences(model, seqs, batch_size=batch_size, mesh=mesh, bar=bar, tail=max(keep))
  nll = -sum(float(lp[-n:].sum(dtype=np.float64)) for (lp, _), n in zip(scored, keep))
  count = sum(keep)
  return {"perplexity": math.exp(nll / count), "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": count,
          "bytes": n_bytes, "window": window, "stride": stride}


def against_context(model, tokenizer, texts: dict[str, str], context_lengths: Sequence[int], *,
                    target_tokens: int = 128, batch_size: int = 8, mesh=None, bar=None) -> dict:
  """Per text and on average, the mean NLL of its last ``target_tokens`` tokens for each window length."""
  lengths = sorted(set(int(c) for c in context_lengths))
  if not lengths or lengths[0] <= target_tokens:
    raise ValueError(f"every context length must exceed --target-tokens={target_tokens}; got {lengths}")
  encoded = {name: tokenizer.encode(t) for name, t in texts.items()}
  used = {n: ids for n, ids in encoded.items() if len(ids) >= lengths[-1]}
  skipped = sorted(set(encoded) - set(used))
  if not used:
    raise ValueError(f"no text has the {lengths[-1]} tokens the longest context needs (longest: "
                     f"{max(len(i) for i in encoded.values())}); give longer texts or shorter --context-lengths")
  seqs = [ids[-c:] for ids in used.values() for c in lengths]
  scored = score_sequences(model, seqs, batch_size=batch_size, mesh=mesh, bar=bar, tail=target_tokens)
  per_text = []
  for t, name in enumerate(used):
    nll = [-float(scored[t * len(lengths) + j][0][-target_tokens:].mean(dtype=np.float64)) for j in range(len(lengths))]
    per_text.append({"name": name, "tokens": len(used[name]), "nll": nll})
  mean = np.mean([t["nll"] for t in per_text], axis=0)
  return {"context_lengths": lengths, "target_tokens": target_tokens, "texts": per_text, "skipped": skipped,
          "mean_nll": mean.tolist(), "perplexity": np.exp(mean).tolist()}
