"""Text domains that every machine has, for the routing analysis (no downloads).

  python   the standard library's own source files (as train/'s default corpus, tests left out)
  prose    English documentation: pydoc's help topics (``pydoc_data.topics``) and module docstrings
  math     generated arithmetic, algebra and LaTeX-like formulas (seeded)
  markup   HTML that pydoc renders for standard-library modules

A user domain is ``NAME=PATH`` (a file, or a folder of .txt/.md/.py files); an empty one is an error.
Each domain is a list of documents (strings), read until ``max_chars`` characters.
"""

from __future__ import annotations

import os
import sysconfig

import numpy as np

BUILTIN = ("python", "prose", "math", "markup")
_MODULES = ("json", "textwrap", "heapq", "bisect", "fractions", "statistics", "string", "difflib", "shlex",
            "calendar", "colorsys", "functools", "collections", "itertools", "csv", "argparse", "decimal", "random")


def _python(max_chars: int) -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(os.path.join(root, f"{m}.py") for m in _MODULES if os.path.isfile(os.path.join(root, f"{m}.py")))
  return _fill((open(f, encoding="utf-8").read() for f in files), max_chars)


def _prose(max_chars: int) -> list[str]:
  import importlib  # noqa: PLC0415
  docs = []
  try:
    from pydoc_data.topics import topics  # noqa: PLC0415
    docs += [topics[k] for k in sorted(topics)]
  except ImportError:  # some distributions strip pydoc_data; docstrings remain
    pass
  for m in _MODULES:
    doc = importlib.import_module(m).__doc__
    if doc:
      docs.append(doc)
  return _fill(docs, max_chars)


def _math(max_chars: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)

  def one() -> str:
    a, b, c = (int(x) for x in rng.integers(2, 999, 3))
    kind = rng.integers(0, 6)
    if kind == 0:
      return f"{a} + {b} * {c} = {a + b * c}"
    if kind == 1:
      return f"({a} - {b}) / {c} = {(a - b) / c:.4f}"
    if kind == 2:
      return f"\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{a}}} = \\frac{{{a * a + b * c}}}{{{a * b}}}"
    if kind == 3:
      return f"\\int_0^{{{a % 9 + 1}}} x^{{{b % 5 + 1}}} \\, dx = \\frac{{{a % 9 + 1}^{{{b % 5 + 2}}}}}{{{b % 5 + 2}}}"
    if kind == 4:
      return f"Let $x = {a}$ and $y = {b}$. Then $x^2 + y^2 = {a * a + b * b}$ and $\\sqrt{{x y}} \\approx {np.sqrt(a * b):.3f}$."
    return f"\\sum_{{k=1}}^{{{a}}} k = \\frac{{{a}({a}+1)}}{{2}} = {a * (a + 1) // 2}"

  docs, total = [], 0
  while total < max_chars:
    doc = "\n".join(one() for _ in range(40))
    docs.append(doc)
    total += len(doc)
  return _fill(docs, max_chars)


def _markup(max_chars: int) -> list[str]:
  import importlib  # noqa: PLC0415
  import pydoc  # noqa: PLC0415
  html = pydoc.HTMLDoc()
  return _fill((html.docmodule(importlib.import_module(m)) for m in _MODULES), max_chars)


def _fill(docs, max_chars: int) -> list[str]:
  """Documents until ``max_chars``, each cut to a quarter of it so that one long file cannot fill a domain."""
  out, total = [], 0
  for d in docs:
    if total >= max_chars:
      break
    if d.strip():
      out.append(d[:min(max_chars - total, max(max_chars // 4, 1))])
      total += len(out[-1])
  return out


def user_domain(name: str, path: str, max_chars: int) -> list[str]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"domain {name}: {path} does not exist")
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".txt", ".md", ".py", ".json", ".jsonl")))
  texts = []
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      texts.append(fh.read())
  docs = _fill(texts, max_chars)
  if not docs:
    raise ValueError(f"domain {name}: {path} holds no text (empty file or folder); give a file with text in it")
  return docs


def load_domains(names, extra: dict[str, str] | None = None, max_chars: int = 40_000) -> dict[str, list[str]]:
  """{domain: documents} for built-in ``names`` and user ``extra`` {name: path}."""
  makers = {"python": _python, "prose": _prose, "math": _math, "markup": _markup}
  out = {}
  for n in names:
    if n not in makers:
      raise ValueError(f"unknown domain {n!r}; built-in domains are {', '.join(BUILTIN)}, or give NAME=PATH")
    out[n] = makers[n](max_chars)
  for n, p in (extra or {}).items():
    out[n] = user_domain(n, p, max_chars)
  if not out:
    raise ValueError("no domains to analyse; name built-in ones or give NAME=PATH")
  return out
