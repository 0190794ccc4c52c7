"""Device meshes from strings such as ``"data=2,expert=4"``.

Axes are always ``data, fsdp, expert, tensor`` in that order (outermost first: ``data`` crosses hosts
and slow links, ``tensor`` stays on the fastest ones). Unspecified axes are 1. We build
``AxisType.Auto`` meshes (see ``sharding.rules`` for why).
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
  """``"data=2,expert=4"`` -> {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}.

  One axis may be ``-1``: it takes whatever the device count leaves (resolved in :func:`make_mesh`).
  """
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
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh {spec!r}: unknown axis {sorted(unknown)}; axes are {', '.join(MESH_AXES)}")
  bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
  if bad or sum(v == -1 for v in sizes.values()) > 1:
    raise ValueError(f"mesh {spec!r}: sizes must be positive (one axis may be -1)")
  return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None, *, devices=None, num_experts: int | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all devices of all processes).

  Refuses a mesh whose size differs from the device count, and an ``expert`` axis that does not
  divide ``num_experts``, naming both numbers.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec)
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


def format_mesh(sizes: Mapping[str, int] | Mesh) -> str:
  if isinstance(sizes, Mesh):
    sizes = dict(sizes.shape)
  return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


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
