"""Global batches through Grain: shuffle, mix, batch, keep this process's columns, prefetch.

The pipeline, as Grain ``MapDataset`` steps (all lazy and index-based, so memory does not depend on the
corpus):

  1. per source s: ``range(rows_s).shuffle(seed_s).repeat()``, a fresh permutation every epoch (Grain's
     index shuffle seeds epoch e with ``seed_s + e``; O(1) memory), tagged ``(s, row)``;
  2. sources mixed by weight (``MapDataset.mix``: a deterministic interleave in the weights' proportions);
  3. ``batch(B)``: global batch j is stream positions ``j*B .. j*B+B-1``, reshaped to ``[A, B/A]``
     microbatches; each process reads only the columns its devices hold (``local``), so the global
     batch, and therefore the losses, do not depend on the process count;
  4. ``to_iter_dataset`` with background reader threads and a small prefetch buffer.

The iterator's state is Grain's (the index of the next global batch) plus the tokens delivered per
source; it is JSON, saved in the Orbax checkpoint's ``data`` item, and restoring it resumes exactly.
"""

from __future__ import annotations

import numpy as np

SEED_STRIDE = 1_000_003  # per-source shuffle seeds: seed * SEED_STRIDE + source index (mod 2**32)


class BatchIterator:
  """Deterministic, resumable global batches ``{key: [A, b, T]}``, b = this process's columns."""

  def __init__(self, sources, batch_size: int, grad_accum: int, seed: int, *, weights=None, names=None,
               shuffle: bool = True, local: slice = slice(None), threads: int = 2, prefetch: int = 4):
    """``sources``: row sets (``rows.TextRows`` / ``PackedChatRows`` or anything with ``len`` and
    ``[i]``); ``weights``: their mixture weights; ``local``: the columns of each microbatch this process
    feeds (``sharding.distributed.process_batch_slice``), all of them in a single-process run."""
    import grain  # noqa: PLC0415 - keeps `import mixtral_jax.train.data` light

    if not isinstance(sources, (list, tuple)):
      sources = [sources]
    names = list(names or [f"source{i}" for i in range(len(sources))])
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    for name, w in zip(names, weights):
      if not w > 0:
        raise ValueError(f"mixture weight {w} of data source {name!r} must be > 0; drop the source instead")
    for name, rows in zip(names, sources):
      if len(rows) == 0:
        raise ValueError(f"data source {name!r} holds no complete row of data.seq_len tokens; add data or "
                         "lower data.seq_len")
    total = sum(len(r) for r in sources)
    if total < batch_size:
      raise ValueError(f"the data holds {total} rows of data.seq_len tokens but one batch needs "
                       f"data.batch_size={batch_size}; add data or lower data.batch_size / data.seq_len")
    self.sources, self.names, self.weights = list(sources), names, weights
    self.B, self.A, self.seed, self.local = batch_size, grad_accum, seed, local
    self.batch = 0  # global batches delivered
    self.source_tokens = {n: 0 for n in names}

    streams = []
    for s, rows in enumerate(sources):
      ids = grain.MapDataset.range(len(rows))
      if shuffle:
        ids = ids.shuffle(seed=(seed * SEED_STRIDE + s) % 2**32)
      streams.append(ids.repeat().map(_Tag(s)))
    mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
    dataset = mixed.batch(batch_size).map(self._read)
    self._dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    self._it = None

  @property
  def batches_per_epoch(self) -> int:
    return sum(len(r) for r in self.sources) // self.B

  def _read(self, ids_B2: np.ndarray) -> dict[str, np.ndarray]:
    """Reads this process's rows of one global batch of (source, row) ids."""
    local = ids_B2.reshape(self.A, self.B // self.A, 2)[:, self.local]
    rows = [self.sources[s][r] for s, r in local.reshape(-1, 2).tolist()]
    out = {k: np.stack([r[k] for r in rows]).reshape(local.shape[0], local.shape[1], -1) for k in rows[0]}
    out["_source_rows"] = np.bincount(ids_B2[:, 0], minlength=len(self.sources))
    return out

  def _iterator(self):
    if self._it is None:
      self._it = iter(self._dataset)
    return self._it

  def state(self) -> dict:
    return {"grain": self._iterator().get_state(), "batch": self.batch, "source_tokens": dict(self.source_tokens)}

  def restore(self, state: dict) -> None:
    if "grain" not in state:
      raise ValueError(f"the checkpoint's data state {state} is from an older data pipeline; resume it with that "
                       "version, or start over with --restart")
    self._iterator().set_state(state["grain"])
    self.batch = int(state["batch"])
    self.source_tokens = {n: int(state.get("source_tokens", {}).get(n, 0)) for n in self.names}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = next(self._iterator())
    rows = out.pop("_source_rows")
    T = out["inputs"].shape[-1]
    for n, count in zip(self.names, rows.tolist()):
      self.source_tokens[n] += count * T
    self.batch += 1
    return out

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()


class _Tag:
  """(source, row) ids for the mixture; a class, not a lambda, so Grain can describe the pipeline."""

  def __init__(self, source: int):
    self.source = source

  def __call__(self, row) -> np.ndarray:
    return np.asarray([self.source, row], np.int64)
