"""How our parameters are assembled from a foreign checkpoint's tensors, validated before any read.

A :class:`Rule` says where one of our parameters comes from: a tensor-name template, that tensor's
shape as symbols (``("NH", "D")``), and a view transform from the tensor to one *unit* of our
parameter. The unit is the whole parameter (``unit=0``), one layer ``p[l]`` (``unit=1``) or one
layer's expert ``p[l, e]`` (``unit=2``, the Hub's per-expert files). :class:`Plan` checks every name
and shape against the config first, then reads any block of any parameter (a device shard, one layer)
touching only the tensors that block needs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Callable, Protocol

import ml_dtypes
import numpy as np

from mixtral_jax import param_paths

Key = tuple[str, ...]
FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float32, ml_dtypes.bfloat16, np.float16, np.float64))
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # buffers that old transformers versions saved
_SHOW = 4  # names listed in an error before "... (n in all)"


class TensorSource(Protocol):
  """A checkpoint's tensors by name (safetensors files, a .pth file)."""

  def names(self) -> list[str]: ...
  def shape(self, name: str) -> tuple[int, ...]: ...
  def dtype(self, name: str) -> np.dtype: ...
  def read(self, name: str) -> np.ndarray: ...  # a lazy view
  def release(self, name: str) -> None: ...  # done with the view: drop its pages
  def where(self, name: str) -> str: ...  # the file holding it, for messages


@dataclasses.dataclass(frozen=True)
class Dims:
  """Symbol -> (size, what the config calls it), e.g. "NH" -> (4096, "num_attention_heads*head_dim")."""
  sizes: dict[str, tuple[int, str]]
  config_file: str  # "config.json" or "params.json"
  layers: tuple[int, str]  # the layer count and the config's name for it
  experts: tuple[int, str]  # likewise for the expert count

  def shape(self, symbols: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(self.sizes[s][0] for s in symbols)


@dataclasses.dataclass(frozen=True)
class Rule:
  key: Key  # our parameter's path in nnx.state(model, nnx.Param)
  name: str  # source tensor name; "{l}" and "{e}" are filled with the unit's indices
  dims: tuple[str, ...]  # the source tensor's shape as Dims symbols
  to_ours: Callable[[np.ndarray], np.ndarray]  # source tensor -> our unit
  unit: int  # leading axes of our parameter that enumerate source tensors (0, 1 or 2)

  def tensor(self, *unit_index: int) -> str:
    return self.name.format(**dict(zip("le", unit_index)))


def _listing(names) -> str:
  names = sorted(names, key=_natural)
  head = ", ".join(repr(n) for n in names[:_SHOW])
  return head + (f", ... ({len(names)} in all)" if len(names) > _SHOW else "")


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _count_hint(names, pattern: str, expected: int, field: str, dims: Dims) -> str:
  found = {int(m.group(1)) for n in names if (m := re.search(pattern, n))}
  if found and max(found) + 1 != expected:
    return (f"; {dims.config_file} says {field}={expected} but the checkpoint has indices "
            f"{min(found)}..{max(found)} ({max(found) + 1})")
  return ""


class Plan:
  """Our parameters (``shapes``: key -> full shape) from ``source`` through ``rules``."""

  def __init__(self, source: TensorSource, rules: list[Rule], dims: Dims, shapes: dict[Key, tuple[int, ...]],
               where: str):
    self.source, self.dims, self.shapes, self.where = source, dims, shapes, where
    self.rules = {r.key: r for r in rules}
    assert set(self.rules) == set(shapes), set(self.rules) ^ set(shapes)

  def expected(self) -> dict[str, tuple[str, ...]]:
    """Every source tensor name the rules read, with its symbolic shape."""
    out = {}
    for key, rule in self.rules.items():
      for unit_index in itertools.product(*(range(n) for n in self.shapes[key][:rule.unit])):
        out[rule.tensor(*unit_index)] = rule.dims
    return out

  def validate(self) -> None:
    """Raises ValueError naming the first problem: missing or unexpected tensors, a shape that
    disagrees with the config (naming the config field), a non-float dtype."""
    expected = self.expected()
    present = {n for n in self.source.names() if not _IGNORED.search(n)}
    missing, unexpected = set(expected) - present, present - set(expected)
    d = self.dims
    hints = (_count_hint(present, r"layers\.(\d+)\.", *d.layers, d)
             + _count_hint(present, r"experts\.(\d+)\.", *d.experts, d))
    if missing:
      raise ValueError(f"{self.where}: missing tensor(s) {_listing(missing)}{hints}")
    if unexpected:
      raise ValueError(f"{self.where}: unexpected tensor(s) {_listing(unexpected)}{hints}; is this a Mixtral "
                       "checkpoint of the layout its config describes?")
    for name in sorted(expected, key=_natural):
      symbols, actual = expected[name], tuple(self.source.shape(name))
      want = d.shape(symbols)
      if actual != want:
        fields = [f"{d.sizes[s][1]}={w}" + (f" but the tensor says {a}" if a != w else "")
                  for s, w, a in itertools.zip_longest(symbols, want, actual, fillvalue=None) if s is not None]
        raise ValueError(
            f"{self.source.where(name)}: tensor {name!r} has shape {list(actual)}, expected {list(want)} "
            f"from {d.config_file} ({', '.join(fields)}); the config disagrees with the tensors or the file "
            "belongs to another model")
      if self.source.dtype(name) not in FLOAT_DTYPES:
        raise ValueError(f"{self.source.where(name)}: tensor {name!r} has dtype {self.source.dtype(name)}, "
                         "expected a floating-point type")

  def dtype(self) -> np.dtype:
    """The storage dtype of the checkpoint (that of its largest tensors)."""
    rule = self.rules[param_paths.LARGEST]
    return self.source.dtype(rule.tensor(*([0] * rule.unit)))

  def read(self, key: Key, index: tuple[slice | int, ...], dtype) -> np.ndarray:
    """Block ``index`` (ints or unit-step slices, one per axis) of parameter ``key``, cast to ``dtype``."""
    rule, shape = self.rules[key], self.shapes[key]
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    ranges = [range(*(i.indices(n) if isinstance(i, slice) else (i, i + 1))) for i, n in zip(index, shape)]
    out = np.empty([len(r) for r in ranges], dtype)
    rest = tuple(slice(r.start, r.stop) for r in ranges[rule.unit:])
    for pos in itertools.product(*(range(len(r)) for r in ranges[:rule.unit])):
      name = rule.tensor(*(r[p] for r, p in zip(ranges, pos)))
      out[pos] = rule.to_ours(self.source.read(name))[rest]
      self.source.release(name)
    return out.reshape([len(r) for r, i in zip(ranges, index) if isinstance(i, slice)])

  def nbytes(self) -> int:
    return sum(math.prod(self.source.shape(n)) * self.source.dtype(n).itemsize for n in self.expected())
