"""Our checkpoint format: an Orbax PyTree checkpoint of ``nnx.state(model, nnx.Param).to_pure_dict()``.

Three ways in and out:

* :func:`save_params` / :func:`restore_params`: Orbax's own ``StandardCheckpointer`` on whole trees
  (a model already in memory; loading, with every array created directly in its shards).
* :class:`StreamingWriter`: writes the same format one block at a time, so conversion never holds more
  than one layer. Orbax's save needs every array in memory, so the writer produces Orbax's on-disk
  layout itself through TensorStore, the library Orbax writes with: one OCDBT database in the
  directory, a zarr (v2, zstd) array per parameter named by its dotted path, chunked by layer (and
  expert), and the ``_METADATA`` tree description that Orbax's restore reads. Orbax's normal restore
  reads the result; the tests check it.
* :class:`ParamsReader`: reads blocks of any Orbax PyTree checkpoint (ours or a training run's) for
  streaming export, through TensorStore with the read spec Orbax itself uses.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from mixtral_jax.checkpoint import digests

Key = tuple[str, ...]
METADATA = "_METADATA"
_DICT_KEY = 2  # orbax's KeyType.DICT in _METADATA
_TS_CONTEXT = {"file_io_concurrency": {"limit": 64}, "cache_pool#ocdbt": {"total_bytes_limit": 10_000_000}}


def _name(key: Key) -> str:
  return ".".join(key)  # orbax names a parameter by its tree path joined with dots


def _kvstore(directory: str, name: str, *, ocdbt: bool) -> dict:
  directory = os.path.abspath(directory)
  if not ocdbt:
    return {"driver": "file", "path": os.path.join(directory, name)}
  return {"driver": "ocdbt", "base": {"driver": "file", "path": directory + "/"}, "path": name,
          "cache_pool": "cache_pool#ocdbt"}


def flatten(tree, prefix: Key = ()) -> dict[Key, object]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def unflatten(flat: dict[Key, object]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = value
  return out


# ------------------------------------------------------------------------------ whole trees (Orbax)

def save_params(directory: str, params: dict) -> None:
  """Orbax save of a tree of arrays that is already in memory (a model, a demo). The caller writes its
  digest file after (``integrity.seal``: the arrays read back, so the digest is of what is on disk)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params)


def restore_params(directory: str, target: dict) -> dict:
  """Orbax restore into ``target``, a tree of ``jax.ShapeDtypeStruct`` with concrete shardings: every
  array is read straight into its shards, cast to the target dtype."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(directory), target)


def stored_shapes(directory: str) -> dict[Key, tuple[int, ...]]:
  """Parameter path -> shape, from each array's own (zarr) metadata; no array data is read.

  Not from ``_METADATA``: its ``write_shape`` is the shape of one written shard, the whole array only
  when the saver held it unsharded (a training run's checkpoint holds e.g. an eighth of each FSDP
  parameter per shard)."""
  return {k: tuple(a.shape) for k, a in _open_arrays(directory).items()}


def _open_arrays(directory: str) -> dict[Key, ts.TensorStore]:
  """Every parameter of the checkpoint as an open, read-only TensorStore (Orbax's own read spec)."""
  meta = _read_metadata(directory)
  keys = [tuple(str(k["key"]) for k in entry["key_metadata"]) for entry in meta["tree_metadata"].values()]
  driver = "zarr3" if meta.get("use_zarr3") else "zarr"
  ocdbt = bool(meta.get("use_ocdbt", True))
  context = ts.Context(_TS_CONTEXT)
  futures = {key: ts.open({"driver": driver, "kvstore": _kvstore(directory, _name(key), ocdbt=ocdbt),
                           "recheck_cached_data": False, "recheck_cached_metadata": False},
                          open=True, read=True, context=context) for key in keys}
  return {key: f.result() for key, f in futures.items()}


def _read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{directory} is not an Orbax checkpoint: {METADATA} is missing") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: corrupt Orbax metadata ({e})") from None


# ------------------------------------------------------------------------------ streaming

class StreamingWriter:
  """Writes an Orbax PyTree checkpoint of ``specs`` (key -> (shape, dtype, chunk shape)) block by block.

  Call :meth:`write` for every block (together covering every array, each array's blocks in C order),
  then :meth:`finalize`. Each write is compressed and committed at once, so memory holds one block plus
  TensorStore's buffers. The blocks' digests go to ``params.digests.json`` beside the directory
  (:mod:`integrity`).
  """

  def __init__(self, directory: str, specs: dict[Key, tuple[tuple[int, ...], np.dtype, tuple[int, ...]]]):
    os.makedirs(directory, exist_ok=True)
    self.directory = os.path.abspath(directory)
    self.specs = specs
    self._context = ts.Context(_TS_CONTEXT)
    self._arrays = {}
    self.digests = digests.Digests()
    for key, (shape, dtype, chunks) in specs.items():
      self.digests.start(key, shape, dtype)
      spec = {"driver": "zarr", "kvstore": _kvstore(self.directory, _name(key), ocdbt=True),
              "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": {"id": "zstd", "level": 1}}}
      self._arrays[key] = ts.open(spec, create=True, dtype=ts.dtype(np.dtype(dtype).name),
                                  context=self._context).result()

  def write(self, key: Key, index: tuple, value: np.ndarray) -> None:
    self._arrays[key][index].write(value).result()
    block = index[0] if digests.block_count(key, self.specs[key][0]) > 1 else 0
    self.digests.add(key, block, np.asarray(value, self.specs[key][1]))

  def finalize(self) -> None:
    """Writes the metadata files that make the directory an Orbax checkpoint."""
    tree = {}
    for key, (shape, _, _) in self.specs.items():
      tree[str(key)] = {"key_metadata": [{"key": k, "key_type": _DICT_KEY} for k in key],
                        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                           "write_shape": list(shape)}}
    meta = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    with open(os.path.join(self.directory, METADATA), "w") as f:
      json.dump(meta, f)
    # Where a restore without a target places each array (Orbax reads this file when none is given).
    device = {"sharding_type": "SingleDeviceSharding", "device_str": str(jax.local_devices()[0])}
    sharding = {base64.urlsafe_b64encode(_name(k).encode()).decode(): json.dumps(device) for k in self.specs}
    with open(os.path.join(self.directory, "_sharding"), "w") as f:
      json.dump(sharding, f)
    now = time.time_ns()
    ckpt_meta = {"item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
                 "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
                 "commit_timestamp_nsecs": now, "custom_metadata": {}}
    with open(os.path.join(self.directory, "_CHECKPOINT_METADATA"), "w") as f:
      json.dump(ckpt_meta, f)
    self.digests.save(self.directory)
    self._arrays.clear()


class ParamsReader:
  """Reads blocks of the arrays of an Orbax PyTree checkpoint (OCDBT or not, zarr v2 or v3)."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    self._arrays = _open_arrays(self.directory)
    self.shapes = {k: tuple(a.shape) for k, a in self._arrays.items()}

  def dtype(self, key: Key) -> np.dtype:
    return np.dtype(self._arrays[key].dtype.numpy_dtype)

  def read(self, key: Key, index: tuple = ()) -> np.ndarray:
    return self.read_async(key, index).result()

  def read_async(self, key: Key, index: tuple = ()):
    """The read of ``array[index]`` issued; ``.result()`` waits for it (TensorStore decompresses on its
    own threads meanwhile)."""
    return self._arrays[key][index].read()

  def chunk_shape(self, key: Key) -> tuple[int, ...]:
    """The shape of one stored chunk (the unit the storage decompresses)."""
    return tuple(self._arrays[key].chunk_layout.read_chunk.shape)

  def nbytes(self) -> int:
    return sum(math.prod(s) * self.dtype(k).itemsize for k, s in self.shapes.items())


def abstract_target(shapes_dtypes: dict[Key, tuple[tuple[int, ...], np.dtype]], shardings: dict[Key, object]):
  """The restore target: ``ShapeDtypeStruct``s with concrete shardings, as a nested dict."""
  return unflatten({k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes_dtypes.items()})
