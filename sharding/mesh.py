"""Device meshes from strings such as ``"data=2,expert=4"`` or ``"dcn_data=2,fsdp=8,expert=8"``.

Axes are always ``data, fsdp, expert, tensor`` in that order (outermost first: ``data`` crosses hosts
and slow links, ``tensor`` stays on the fastest ones). Unspecified axes are 1. We build
``AxisType.Auto`` meshes (see ``sharding.rules`` for why).

Multi-slice (TPU pods joined by the data-center network, DCN): a ``dcn_`` prefix gives an axis's size
*across* slices; the plain name gives its size inside one slice (ICI). As in MaxText, the two are
merged into one mesh axis of size ``dcn x ici`` whose outer (slowest-varying) part steps across
slices, built by ``mesh_utils.create_hybrid_device_mesh`` from the devices' ``slice_index``. So
``dcn_data=2,fsdp=8,expert=8`` on two 64-chip slices is the mesh ``data=2,fsdp=8,expert=8`` in which
each ``data`` index is one slice: only what reduces over ``data`` (the gradient all-reduce) crosses
DCN, while the expert all-to-all and the FSDP gathers stay on a slice's inter-chip links. Keeping the
axis names unchanged means the logical-axis table, the batch split and checkpoints (restore on any
slice count) need nothing new.

Devices without a ``slice_index`` (CPU, GPU) are one slice. ``simulated_slices=N`` splits them, in
order, into N equal groups that stand for slices, so tests on simulated CPU devices run the very mesh
a multi-slice pod gets (numerically a CPU mesh is the same whichever link an axis crosses).
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")
DCN = "dcn_"  # prefix of an axis size that spans slices


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
  """``"data=2,expert=4"`` -> {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}: each axis's whole size
  (a ``dcn_`` part multiplied in; :func:`parse_hybrid` keeps the two apart).

  One axis may be ``-1``: it takes whatever the device count leaves (resolved in :func:`make_mesh`).
  """
  ici, dcn = parse_hybrid(spec)
  return {a: ici[a] * dcn[a] if ici[a] != -1 else -1 for a in MESH_AXES}


def parse_hybrid(spec: str | Mapping[str, int] | None) -> tuple[dict[str, int], dict[str, int]]:
  """``"dcn_data=2,fsdp=8"`` -> (sizes inside a slice, sizes across slices), each over all four axes."""
  if spec is None or spec == "" or spec == "none":
    sizes: dict[str, int] = {}
  elif isinstance(spec, Mapping):
    sizes = dict(spec)
  else:
    sizes = {}
    for part in str(spec).replace(" ", "").split(","):
      if not part:
        continue
      if "=" not in part:
        raise ValueError(f"mesh {spec!r}: expected NAME=SIZE items such as 'data=2,expert=4', got {part!r}")
      name, value = part.split("=", 1)
      try:
        sizes[name] = int(value)
      except ValueError:
        raise ValueError(f"mesh {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
  unknown = set(sizes) - set(MESH_AXES) - {DCN + a for a in MESH_AXES}
  if unknown:
    raise ValueError(f"mesh {spec!r}: unknown axis {sorted(unknown)}; axes are {', '.join(MESH_AXES)} "
                     f"(a {DCN} prefix, as in {DCN}data=2, spans slices)")
  bad = {k: v for k, v in sizes.items() if v == 0 or v < -1 or (k.startswith(DCN) and v < 1)}
  if bad or sum(v == -1 for v in sizes.values()) > 1:
    raise ValueError(f"mesh {spec!r}: sizes must be positive (one axis inside a slice may be -1)")
  return {a: sizes.get(a, 1) for a in MESH_AXES}, {a: sizes.get(DCN + a, 1) for a in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None, *, devices=None, num_experts: int | None = None,
              simulated_slices: int | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all devices of all processes).

  Refuses a mesh whose size differs from the device count, and an ``expert`` axis that does not
  divide ``num_experts``, naming both numbers. ``simulated_slices``: see the module docstring.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = parse_hybrid(spec)
  if simulated_slices is not None:  # checked even for a flat mesh: never silently ignored on TPU devices
    device_slices(devices, simulated_slices)
  if any(v > 1 for v in dcn.values()):
    return _hybrid_mesh(spec, ici, dcn, devices, num_experts, simulated_slices)
  sizes = ici
  if not sizes or all(v == 1 for v in sizes.values()):
    sizes = {**sizes, "data": -1} if len(devices) > 1 else sizes
  if -1 in sizes.values():
    known = math.prod(v for v in sizes.values() if v != -1)
    if len(devices) % known:
      raise ValueError(f"mesh {spec!r}: the other axes ({known}) do not divide the {len(devices)} "
                       f"device{'s' * (len(devices) != 1)}")
    sizes = {a: (len(devices) // known if v == -1 else v) for a, v in sizes.items()}
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(
        f"mesh {format_mesh(sizes)} has {total} device{'s' * (total != 1)} but {len(devices)} "
        f"{'is' if len(devices) == 1 else 'are'} available; "
        f"make the axis sizes multiply to {len(devices)} (an axis of -1 takes the rest)")
  if num_experts is not None and num_experts % sizes["expert"]:
    raise ValueError(
        f"mesh axis expert={sizes['expert']} does not divide the {num_experts} experts; "
        f"use a divisor of {num_experts}")
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  except Exception:  # noqa: BLE001 - topology-aware placement can refuse odd shapes; fall back to order
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_slices(devices, simulated_slices: int | None = None) -> dict[int, list]:
  """slice index -> that slice's devices (devices without ``slice_index``, as CPU and GPU ones, are one
  slice, or ``simulated_slices`` equal groups in device order)."""
  devices = list(devices)
  if simulated_slices is not None:
    if any(getattr(d, "slice_index", None) is not None for d in devices):
      raise ValueError(f"simulated_slices={simulated_slices} given for devices that have a slice_index; "
                       "drop simulated_slices and let the devices' own slices count")
    if simulated_slices < 1 or len(devices) % simulated_slices:
      raise ValueError(f"simulated_slices={simulated_slices} does not split the {len(devices)} devices into "
                       "equal slices; use a divisor of the device count")
    per = len(devices) // simulated_slices
    return {i: devices[i * per:(i + 1) * per] for i in range(simulated_slices)}
  slices: dict[int, list] = {}
  for d in devices:
    slices.setdefault(getattr(d, "slice_index", 0) or 0, []).append(d)
  return slices


def _hybrid_mesh(spec, ici: dict, dcn: dict, devices: list, num_experts: int | None,
                 simulated_slices: int | None = None) -> Mesh:
  """A multi-slice mesh: ``dcn`` sizes across slices, ``ici`` sizes inside each (see the module doc)."""
  slices = device_slices(devices, simulated_slices)
  n_dcn = math.prod(dcn.values())
  dcn_text = ",".join(f"{DCN}{a}={v}" for a, v in dcn.items() if v > 1)
  if len(slices) == 1:
    raise ValueError(f"mesh {spec!r}: {dcn_text} spans slices but the {len(devices)} devices are one slice; "
                     f"drop the {DCN} prefix (e.g. {dcn_text.replace(DCN, '')}) on a single slice")
  counts = {i: len(ds) for i, ds in sorted(slices.items())}
  if len(set(counts.values())) > 1:
    raise ValueError(f"mesh {spec!r}: slices of unequal size (devices per slice {counts}); "
                     f"a multi-slice mesh needs the same number of devices in every slice")
  if n_dcn != len(slices):
    raise ValueError(f"mesh {spec!r}: the {DCN} axes multiply to {n_dcn} but there are {len(slices)} slices; "
                     f"make them multiply to {len(slices)}")
  per_slice = len(devices) // len(slices)
  try:  # resolve -1 and check the sizes inside one slice as a mesh over one slice's devices
    ici = dict(make_mesh(ici, devices=next(iter(slices.values()))).shape)
  except ValueError as e:
    raise ValueError(f"mesh {spec!r}, inside each slice of {per_slice} devices: {e}") from None
  merged = {a: ici[a] * dcn[a] for a in MESH_AXES}
  if num_experts is not None and num_experts % merged["expert"]:
    raise ValueError(f"mesh axis expert={merged['expert']} does not divide the {num_experts} experts; "
                     f"use a divisor of {num_experts}")
  ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
  if simulated_slices is not None:  # JAX's helper groups by slice_index, which these devices lack
    return Mesh(_blocks(ici_shape, dcn_shape, list(slices.values())), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))
  try:
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # a shape the torus cannot hold whole: split axes
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices,
                                                allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _blocks(ici_shape: list[int], dcn_shape: list[int], groups: list[list]) -> np.ndarray:
  """What ``create_hybrid_device_mesh`` builds, over explicit groups: one ``ici_shape`` block per group,
  the blocks laid out in ``dcn_shape`` (so the outer part of each axis steps across groups)."""
  per_group = [mesh_utils.create_device_mesh(ici_shape, g) for g in groups]
  layout = np.arange(len(groups)).reshape(dcn_shape)
  return np.block(np.vectorize(lambda i: per_group[i], otypes=[object])(layout).tolist())


def format_mesh(sizes: Mapping[str, int] | Mesh) -> str:
  """``data=2,fsdp=4,expert=8``; a mesh over several slices adds how many (``..., 2 slices``)."""
  slices = len(device_slices(sizes.devices.flat)) if isinstance(sizes, Mesh) else 1
  if isinstance(sizes, Mesh):
    sizes = dict(sizes.shape)
  return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes) + (f", {slices} slices" if slices > 1 else "")


def current_platform() -> str:
  """``cpu``, ``gpu`` or ``tpu``: the platform of the devices the code being traced will run on.

  Under a mesh (``jax.set_mesh``, also inside ``jit``) this is the mesh's device platform, so a
  program compiled ahead of time for TPU devices on a CPU host (``jax.experimental.topologies``)
  picks the TPU kernels and collectives; without a mesh it is the process's default backend. Kernel
  and dispatch choices read this, never ``jax.default_backend()`` directly.
  """
  mesh = jax.sharding.get_abstract_mesh()
  platform = None
  if mesh is not None and not mesh.empty:
    device = getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None)
  platform = platform or jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform
