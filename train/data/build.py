"""From the run config to batch iterators: find or make the shards, check them, cut rows, mix.

``data.sources`` lists shard directories (``mixtral-jax tokenize`` output) with mixture weights. Without
it, ``data.paths`` is read: shard directories are used as they are, anything else (files, directories,
globs, ``stdlib``) is tokenized on first use into ``WORKDIR/data/<kind>-<key>/`` (the key hashes the
inputs and the tokenizer, so a rerun finds it and a changed input makes a new one). Either way training
reads shards through the same Grain pipeline.

Preference pairs (DPO, ``data.format: preference``) go the same way: ``mixtral-jax tokenize --preference``
shards (``preference_shards``), or JSONL tokenized on first use into ``WORKDIR/data/preference-<key>/``;
each row is one pair, held out pair by pair.

Checks, all before anything compiles: every manifest's tokenizer is the run's; every shard's checksum
(each process verifies its share of the shards, shard k by process k mod P, so a pod reads the corpus
once); weights are positive; there is at least one global batch of rows.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from . import shards as shards_lib
from .pipeline import BatchIterator
from .rows import ShardSet, make_rows
from .tokenize import TokenizeSpec, plan, plan_key, tokenize
from .files import find_files


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  directory: str
  weight: float


@dataclasses.dataclass
class Data:
  train: BatchIterator
  heldout: list  # held-out batches, in order, this process's columns
  train_rows: int
  sources: list


def parse_sources(specs) -> list[tuple[str, str, float]]:
  """(name, path, weight) of every ``data.sources`` entry, checked."""
  out = []
  for i, spec in enumerate(specs):
    if isinstance(spec, str):
      spec = {"path": spec}
    if not isinstance(spec, dict) or "path" not in spec:
      raise ValueError(f"data.sources[{i}]={spec!r}: each source is {{path: DIR, weight: W}}")
    unknown = set(spec) - {"path", "weight", "name"}
    if unknown:
      raise ValueError(f"data.sources[{i}]: unknown key(s) {sorted(unknown)}; a source has path, weight, name")
    weight = spec.get("weight", 1.0)
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      raise ValueError(f"data.sources[{i}] ({spec['path']}): weight {weight!r} is not a number") from None
    if not weight > 0:
      raise ValueError(f"data.sources[{i}] ({spec['path']}): mixture weight {weight} must be > 0; drop the "
                       "source instead")
    path = os.path.expanduser(str(spec["path"]))
    out.append((str(spec.get("name") or os.path.basename(os.path.normpath(path))), path, weight))
  names = [n for n, _, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"data.sources names {names} repeat; give each source a distinct name")
  return out


def is_shard_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(os.path.expanduser(str(path)), shards_lib.MANIFEST))


def resolve_sources(cfg, tokenizer, data_dir: str | None, progress: bool = False) -> list[Source]:
  """The shard directories this run reads, tokenizing ``data.paths`` on first use (module docstring)."""
  d = cfg.data
  if d.sources:
    return [Source(*s) for s in parse_sources(d.sources)]
  if all(is_shard_dir(p) for p in d.paths):
    return [Source(*s) for s in parse_sources(list(d.paths))]
  if any(is_shard_dir(p) for p in d.paths):
    raise ValueError(f"data.paths {list(d.paths)} mixes shard directories and raw files; list shard directories "
                     "under data.sources, or tokenize the files first")
  spec = TokenizeSpec(tokenizer=tokenizer.path, kind=d.format, field=d.field, chat_version=d.chat_version,
                      heldout_fraction=d.heldout_fraction)
  exts = (".jsonl", ".json") if d.format in ("chat", "preference") else d.extensions
  pairs = find_files(d.paths, exts)[:d.max_files or None]
  key = plan_key(plan(pairs, spec, shards_lib.tokenizer_fingerprint(tokenizer.path)))
  if data_dir is None:
    raise ValueError("data.paths holds raw files but no directory was given to tokenize them into")
  out = os.path.join(data_dir, f"{d.format}-{key}")
  tokenize(list(d.paths), out, spec, workers=d.workers, extensions=exts, progress=progress, pairs=pairs)
  return [Source("data", out, 1.0)]


def build(cfg, tokenizer, data_dir: str | None, *, local: slice = slice(None), progress: bool = False) -> Data:
  """The training iterator and the held-out batches of ``cfg`` (module docstring)."""
  d = cfg.data
  fingerprint = shards_lib.tokenizer_fingerprint(tokenizer.path)
  sources = resolve_sources(cfg, tokenizer, data_dir, progress)
  me, count = jax.process_index(), jax.process_count()
  train_rows, held_rows = [], []
  for src in sources:
    manifest = shards_lib.load_manifest(src.directory)
    shards_lib.check_tokenizer(manifest, src.directory, fingerprint, tokenizer.path)
    _check_kind(manifest, src, d.format)
    if manifest["splits"]["train"]["tokens"] == 0:
      raise ValueError(f"data source {src.name!r} ({src.directory}) holds no tokens (empty source)")
    for split, into in (("train", train_rows), ("heldout", held_rows)):
      shard_set = ShardSet(src.directory, manifest, split)
      shard_set.verify(range(me, len(shard_set.records), count))
      into.append(make_rows(shard_set, d.seq_len))
  names = [s.name for s in sources]
  train = BatchIterator(train_rows, d.batch_size, cfg.optimizer.grad_accum, cfg.train.seed,
                        weights=[s.weight for s in sources], names=names, local=local)
  held = [r for r in held_rows if len(r)]
  heldout = []
  if held and cfg.train.eval_every and sum(map(len, held)) >= d.batch_size:
    held_it = BatchIterator(_Concat(held), d.batch_size, cfg.optimizer.grad_accum, 0, shuffle=False, local=local,
                            threads=0, prefetch=0)
    heldout = [next(held_it) for _ in range(min(cfg.train.eval_batches, held_it.batches_per_epoch))]
  return Data(train, heldout, sum(map(len, train_rows)), sources)


def _check_kind(manifest: dict, src: Source, data_format: str) -> None:
  """Preference shards feed only DPO (data.format=preference), and DPO reads only preference shards."""
  kind = manifest.get("kind", "text")
  if (kind == "preference") != (data_format == "preference"):
    fix = ("make them with mixtral-jax tokenize --preference" if data_format == "preference" else
           "set data.format=preference (DPO), or point data.paths at text/chat shards")
    raise ValueError(f"data source {src.name!r} ({src.directory}) holds {kind} shards but data.format={data_format}; "
                     f"{fix}")


class _Concat:
  """Row sets back to back (the held-out rows of every source)."""

  def __init__(self, parts):
    self.parts = parts
    self.starts = [0]
    for p in parts:
      self.starts.append(self.starts[-1] + len(p))

  def __len__(self) -> int:
    return self.starts[-1]

  def __getitem__(self, i: int):
    for k, p in enumerate(self.parts):
      if i < self.starts[k + 1]:
        return p[i - self.starts[k]]
    raise IndexError(i)
