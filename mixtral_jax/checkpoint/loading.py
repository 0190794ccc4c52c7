"""``load(path)``: any supported checkpoint -> a callable ``Mixtral``, every parameter created directly in
its final place (and, with a mesh, in its shards) from the files, without a random model first.

The model is built as ``nnx.eval_shape`` (shapes only) and filled one layer at a time, every format
alike (each layer slice read from the mapped files, or from our Orbax checkpoint through TensorStore,
and written into a preallocated, donated device buffer, so host memory holds one layer's slice, or one
storage chunk of an Orbax array, never a second copy of the model).

With ``quantize="int8"`` every format is read the same way, and each
layer of each matmul weight is quantized on its devices as soon as it is there, before the next is
read: the full-precision model never exists, only the int8 one and one layer in flight.

Nothing non-finite or damaged gets in: foreign formats count NaN/Inf in every block as it is read; our
Orbax format is read block by block through TensorStore (``integrity.VerifiedReader``: each layer's
CRC-32 against ``params.crc32.json`` and its NaN/Inf count as it is read), as the int8 path always did. The error names the tensor and the count;
``allow_nonfinite=True`` lets such weights through with a warning.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from mixtral_jax import quant, quant_nf4
from mixtral_jax.checkpoint import bnb4, bnb4_params, consolidated, formats, hf, integrity, orbax_io
from mixtral_jax.checkpoint.layout import Key, Plan
from mixtral_jax.config import MixtralConfig
from mixtral_jax.inference import quantize as quantize_lib
from mixtral_jax.layers import LOGICAL_AXES
from mixtral_jax.lora import merge as lora_merge
from mixtral_jax.lora import run as lora_run
from mixtral_jax.model import Mixtral
from mixtral_jax.params import abstract_model, param_shardings


def runtime_overrides(dtype, param_dtype, runtime) -> dict[str, Any]:
  """The config's runtime fields to override; architecture fields come from the checkpoint only."""
  unknown = set(runtime) - set(MixtralConfig._RUNTIME_FIELDS)
  if unknown:
    raise ValueError(f"cannot override {', '.join(sorted(unknown))} when loading: the checkpoint fixes the "
                     f"architecture; runtime options are {', '.join(MixtralConfig._RUNTIME_FIELDS)}")
  out = dict(runtime)
  if dtype is not None:
    out["dtype"] = str(jnp.dtype(dtype))
  if param_dtype is not None:
    out["param_dtype"] = str(jnp.dtype(param_dtype))
  return out


def load_config(path: str | os.PathLike, **runtime) -> MixtralConfig:
  """The model config of a checkpoint in any supported format, with runtime overrides."""
  return config_for(formats.detect(path), runtime)


def config_for(found: formats.Found, runtime) -> MixtralConfig:
  if found.kind == "consolidated":
    return consolidated.load_config(found.directory, **runtime)
  return MixtralConfig.load(found.config, **runtime)


def our_shapes(cfg: MixtralConfig) -> tuple[dict[Key, tuple[int, ...]], dict[Key, tuple[str, ...]]]:
  """Our parameters' shapes and logical axes, from the abstract model."""
  shapes, axes = {}, {}
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
    key = tuple(str(p) for p in path)
    shapes[key], axes[key] = tuple(var.shape), tuple(var.get_metadata()[LOGICAL_AXES])
  return shapes, axes


def open_plan(found: formats.Found, cfg: MixtralConfig) -> Plan:
  """A validated :class:`Plan` for a foreign (HF or consolidated) checkpoint."""
  shapes, _ = our_shapes(cfg)
  if found.kind == "hf":
    source = hf.open_source(found.directory)
    plan = Plan(source, hf.rules(cfg, source.names()), hf.dims(cfg), shapes, found.directory)
  else:
    source = consolidated.open_source(found.directory)
    plan = Plan(source, consolidated.rules(cfg), consolidated.dims(cfg), shapes, found.directory)
  plan.validate()
  return plan


def check_orbax_shapes(params_dir: str, shapes: dict[Key, tuple[int, ...]], config: str) -> None:
  stored = orbax_io.stored_shapes(params_dir)
  missing, unexpected = set(shapes) - set(stored), set(stored) - set(shapes)
  names = lambda keys: ", ".join(sorted(".".join(k) for k in keys)[:4])  # noqa: E731
  if missing:
    raise ValueError(f"{params_dir}: missing parameter(s) {names(missing)} ({len(missing)} in all)")
  if unexpected:
    raise ValueError(f"{params_dir}: unexpected parameter(s) {names(unexpected)} ({len(unexpected)} in all)")
  for key, shape in sorted(shapes.items()):
    if stored[key] != shape:
      raise ValueError(f"{params_dir}: parameter {'.'.join(key)!r} has shape {list(stored[key])}, expected "
                       f"{list(shape)} from {config}; the config disagrees with the checkpoint")


def _mesh(mesh, cfg: MixtralConfig):
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  from mixtral_jax.sharding.mesh import make_mesh  # noqa: PLC0415

  return make_mesh(mesh, num_experts=cfg.num_local_experts)


def _shardings(cfg: MixtralConfig, mesh, quantize: str | None = None) -> dict[Key, jax.sharding.Sharding]:
  """Every parameter's placement (with ``quantize``, the int8 model's, scales included)."""
  state = nnx.state(abstract_model(cfg, quantize), nnx.Param)
  if mesh is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    return {tuple(str(p) for p in path): device for path, _ in nnx.to_flat_state(state)}
  state = param_shardings(state, mesh)
  return {tuple(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def load(path: str | os.PathLike, *, mesh=None, dtype=None, param_dtype=None, adapter=None, quantize=None,
         allow_nonfinite: bool = False, **runtime) -> Mixtral:
  """Loads a Hugging Face directory, a Mistral consolidated directory or our Orbax checkpoint.

  ``adapter``: a PEFT LoRA adapter directory or a mixtral-jax LoRA run, merged into the weights
  (``mixtral_jax.lora.merge``); it must fit this base (checked before anything is read).

  ``mesh``: a ``jax.sharding.Mesh`` or a string such as ``"expert=4"``; parameters are then created in
  their shards (``mixtral_jax.params.param_shardings``); call the model under ``jax.set_mesh(mesh)``.
  ``dtype`` / ``param_dtype`` and ``runtime`` override the config's runtime fields (``capacity_factor``...).

  ``quantize="int8"`` (or ``"nf4"``: attention and experts in bitsandbytes' 4-bit NormalFloat, the LM head
  in float): the model :func:`mixtral_jax.inference.quantize.quantize` makes, quantized as it
  is read: each matmul weight goes to its devices one layer at a time in ``param_dtype`` and is turned
  into int8 values and scales there before the next layer is read, so the devices hold the int8 model
  plus one layer of one weight in full precision (8x7B: 47 GB, plus at most 0.94 GB of bf16 and its
  float32 working copy), never the 93 GB bf16 model. A weight an adapter changes is read whole,
  merged, then quantized.

  A Hugging Face directory quantized by bitsandbytes to nf4 (``quantization_config`` in config.json) loads
  straight into the nf4 model, its codes and scales as they are (``mixtral_jax.checkpoint.bnb4``).

  ``allow_nonfinite``: load weights holding NaN/Inf (warned) instead of raising
  ``integrity.NonFiniteError``. A checksum mismatch is always an error (``integrity.ChecksumError``).
  """
  found = formats.detect(path)
  cfg = config_for(found, runtime_overrides(dtype, param_dtype, runtime))
  if quantize is not None and quantize not in quantize_lib.MODES:
    raise ValueError(f"unknown quantization {quantize!r}; supported: {', '.join(quantize_lib.MODES)}")
  if found.kind == "hf" and bnb4.quantization_config(found.directory) is not None:
    return _load_bnb4(found, cfg, _mesh(mesh, cfg), quantize, adapter)
  factors = None
  if found.kind == "orbax" and lora_run.is_lora_run(os.path.dirname(found.config)):
    raise ValueError(f"{path} is a LoRA training run: its checkpoints hold adapters only. Load its base with the "
                     f"adapter: from_pretrained(BASE, adapter={str(path)!r}), or generate --model BASE --adapter "
                     f"{path}")
  if adapter is not None:
    factors = lora_merge.load_factors(adapter, cfg)  # checked against this base before any weight is read
  mesh = _mesh(mesh, cfg)
  shapes, _ = our_shapes(cfg)
  cfg, read_block, finite = _block_reader(found, cfg, shapes, allow_nonfinite, param_dtype)
  arrays = _read_arrays(cfg, shapes, read_block, finite, _shardings(cfg, mesh, quantize), quantize, factors)
  return _merge(cfg, arrays, quantize)


def _block_reader(found: formats.Found, cfg: MixtralConfig, shapes, allow_nonfinite: bool, param_dtype):
  """(the config, ``read_block(key, index, dtype)`` reading one block of a stored parameter, the finite
  check that counts what was read) for a checkpoint of any format. Orbax storage is checked by its
  verifying reader (shapes checked first); a foreign checkpoint goes through its validated plan, and a
  consolidated one takes its parameter dtype from its tensors when none is given."""
  finite = integrity.FiniteCheck(found.directory, allow=allow_nonfinite)
  if found.kind == "orbax":
    reader = integrity.VerifiedReader(found.params, allow_nonfinite=allow_nonfinite)  # names damaged storage
    check_orbax_shapes(found.params, shapes, found.config)
    finite = integrity.FiniteCheck(found.directory, allow=True)  # the reader checks; not counted twice
    read_block = lambda key, idx, dtype: np.asarray(reader.read(key, tuple(idx))).astype(dtype)  # noqa: E731
    return cfg, read_block, finite
  plan = open_plan(found, cfg)
  if found.kind == "consolidated" and param_dtype is None:  # params.json does not say; the tensors do
    cfg = cfg.replace(param_dtype=str(jnp.dtype(plan.dtype())))
  read_block = lambda key, idx, dtype: finite.add(".".join(key), plan.read(key, idx, dtype=dtype))  # noqa: E731
  return cfg, read_block, finite


def _read_arrays(cfg: MixtralConfig, shapes, read_block, finite, shardings, quantize, factors) -> dict:
  """Every parameter created on its devices from ``read_block``: a quantization site without an
  adapter is quantized as it is read (one layer at a time); an adapted weight is read in full, merged
  with its LoRA factors, then quantized if it is a site."""
  targets = _leaves(cfg, quantize)
  sites = quantize_lib.site_axes(quantize) if quantize else {}
  dt = jnp.dtype(cfg.param_dtype)
  adapted = {lora_merge.PARAM_KEYS[f.target]: f for f in factors or ()}
  arrays = {}
  for key, shape in shapes.items():
    read = functools.partial(read_block, key, dtype=dt)
    stacked = key[0] == "blocks"
    axes = sites.get(key)
    keys = (key,) + tuple(key[:-1] + (key[-1] + s,) for s in quant.FORMS[quantize].suffixes) if axes else (key,)
    if axes is not None and key not in adapted:
      arrays.update(zip(keys, _create_quantized(shape, dt, keys, targets, shardings, axes, quantize, read,
                                                stacked=stacked)))
      finite.done(".".join(key), int(np.prod(shape)))
      continue
    arrays[key] = _create(shape, dt, shardings[key], read, stacked=stacked)
    finite.done(".".join(key), int(np.prod(shape)))
    if key in adapted:
      arrays[key] = lora_merge.merge_arrays({key: arrays[key]}, [adapted[key]])[key]
    if axes is not None:
      q, extras = quantize_lib.quantize_form_into(arrays[key], axes, quantize, shardings[key],
                                                  tuple(shardings[k] for k in keys[1:]))
      arrays.update(zip(keys, (q, *extras.values())))
  return arrays


def _leaves(cfg: MixtralConfig, quantize: str | None) -> dict[Key, tuple[tuple[int, ...], jnp.dtype]]:
  """(shape, dtype) of every parameter of the (quantized) model, from shapes alone."""
  state = nnx.state(abstract_model(cfg, quantize), nnx.Param)
  return {tuple(str(p) for p in path): (tuple(v.shape), jnp.dtype(v.dtype)) for path, v in nnx.to_flat_state(state)}


def _load_bnb4(found: formats.Found, cfg: MixtralConfig, mesh, quantize, adapter) -> Mixtral:
  """A bitsandbytes nf4 checkpoint straight into our nf4 model (``mixtral_jax.checkpoint.bnb4_params``):
  its codes and scales are placed as they are (no float copy of the model), float tensors in ``param_dtype``."""
  if quantize not in (None, "nf4"):
    raise ValueError(f"{found.directory} is a bitsandbytes nf4 checkpoint: it loads as nf4 (quantize='nf4' or "
                     f"None), not quantize={quantize!r}; use the float checkpoint for int8")
  if adapter is not None:
    raise ValueError(f"{found.directory} is a bitsandbytes nf4 checkpoint: adapters are not merged into 4-bit "
                     "weights; train or generate with the adapter as LoRA on the nf4 base instead")
  shapes, _ = our_shapes(cfg)
  params = bnb4_params.read_params(found.directory, cfg, shapes, dtype=jnp.dtype(cfg.param_dtype))
  shardings = _shardings(cfg, mesh, "nf4")
  arrays = {}
  for key, value in params.items():
    if isinstance(value, bnb4.Nf4Tensor):
      arrays[key] = jax.device_put(value.codes, shardings[key])
      absmax_key = key[:-1] + (key[-1] + quant_nf4.ABSMAX,)
      arrays[absmax_key] = jax.device_put(value.absmax, shardings[absmax_key])
    else:
      arrays[key] = jax.device_put(value, shardings[key])
  return _merge(cfg, arrays, "nf4")


def _merge(cfg: MixtralConfig, arrays: dict[Key, jax.Array], quantize: str | None = None) -> Mixtral:
  graphdef, state = nnx.split(abstract_model(cfg, quantize))
  nnx.replace_by_pure_dict(state, orbax_io.unflatten(arrays))
  return nnx.merge(graphdef, state)


def _create(shape, dtype, sharding, read: Callable[[tuple], np.ndarray], *, stacked: bool) -> jax.Array:
  """One parameter, made directly in ``sharding`` from ``read(index) -> block``. A stacked parameter is
  filled one layer at a time into a donated buffer, so the host holds one layer's slice (its shards, one
  copy per local device that holds them) at a time, never the whole parameter."""
  if not stacked:
    return jax.make_array_from_callback(shape, sharding, _once_per_block(read))
  layer_sharding = _drop_leading_axis(sharding)
  buf = _zeros(shape, dtype, sharding)
  for layer in range(shape[0]):
    read_layer = _once_per_block(lambda idx, l=layer: read((l,) + tuple(idx)))
    buf = _set_layer(buf, jax.make_array_from_callback(shape[1:], layer_sharding, read_layer), layer)
  return buf


def _create_quantized(shape, dtype, keys, targets, shardings, axes, mode, read: Callable[[tuple], np.ndarray], *,
                      stacked: bool) -> list[jax.Array]:
  """One matmul weight in the stored form ``mode`` (its values, then its sibling leaves, for ``keys``), in
  their shardings, quantized as it is read: each layer's slice is made on its devices in ``dtype`` (as
  :func:`_create` does), quantized there and written into donated buffers shaped as ``targets`` says,
  then dropped before the next slice is read."""
  sh = tuple(shardings[k] for k in keys)
  if not stacked:
    w = jax.make_array_from_callback(shape, sh[0], _once_per_block(read))
    q, extras = quantize_lib.quantize_form_into(w, axes, mode, sh[0], sh[1:])
    return [q, *extras.values()]
  layer_sh = tuple(_drop_leading_axis(s) for s in sh)
  bufs = [_zeros(targets[k][0], targets[k][1], s) for k, s in zip(keys, sh)]
  for layer in range(shape[0]):
    read_layer = _once_per_block(lambda idx, l=layer: read((l,) + tuple(idx)))
    w = jax.make_array_from_callback(shape[1:], layer_sh[0], read_layer)
    q, extras = quantize_lib.quantize_form_into(w, axes, mode, layer_sh[0], layer_sh[1:])
    del w  # the full-precision slice is gone before the next one is read
    bufs = [_set_layer(b, part, layer) for b, part in zip(bufs, (q, *extras.values()))]
  return bufs


def _once_per_block(read: Callable[[tuple], np.ndarray]) -> Callable[[tuple], np.ndarray]:
  """``make_array_from_callback`` asks once per device; replicas of a block are read from disk once."""
  seen: dict[tuple, np.ndarray] = {}

  def cached(idx):
    key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)
    if key not in seen:
      seen[key] = read(idx)
    return seen[key]

  return cached


def _drop_leading_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec)
    assert not spec or spec[0] is None, f"the layer axis is never sharded, got {sharding.spec}"
    return NamedSharding(sharding.mesh, P(*spec[1:]))
  return sharding


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(shape, dtype, sharding):
  return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buf: jax.Array, part: jax.Array, layer) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(buf, part.astype(buf.dtype), layer, 0)
