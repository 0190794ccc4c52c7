"""What every plan shares: the devices to compile for, compiling with a verdict, the per-device figures of a
compiled program, and the ``--device`` verdict in words.

The devices (:func:`target_devices`) are a TPU slice or NVIDIA GPUs from ``--topology`` (``topology``:
compile-only devices, the real TPU compiler or XLA:GPU, deviceless); otherwise this host's devices, or
simulated CPU devices when the mesh needs more than exist and JAX has not started on an accelerator
(``--simulate`` forces that): XLA:CPU then stands in for the target, and :func:`compiler_label` says so.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from mixtral_jax.config import MixtralConfig, get_config
from mixtral_jax.sharding.mesh import format_mesh

from . import topology
from .hlo_stats import hlo_stats

GiB = 2**30

# ------------------------------------------------------------------------------------ compiling


def shard_bytes(tree) -> float:
  """Bytes per device of a tree of sharded ``ShapeDtypeStruct``s (or arrays)."""
  return float(sum(math.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
                   for s in jax.tree.leaves(tree)))


def cost_analysis_flops(compiled) -> float | None:
  """``compiled.cost_analysis()["flops"]``: counts each loop body once (see ``train.hlo_stats``)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and "flops" in ca else None


def compiled_figures(compiled) -> dict:
  """Memory analysis, HLO statistics and the peak (arguments + outputs - aliased + temporaries)."""
  mem = compiled.memory_analysis()
  out = {"temp_bytes": float(mem.temp_size_in_bytes), "argument_bytes": float(mem.argument_size_in_bytes),
         "output_bytes": float(mem.output_size_in_bytes), "alias_bytes": float(mem.alias_size_in_bytes)}
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  # pinned host memory the program itself allocates: the activations an offloading remat policy keeps
  out["host_temp_bytes"] = float(getattr(mem, "host_temp_size_in_bytes", 0) or 0)
  out.update(hlo_stats(compiled.as_text()))
  out["cost_analysis_flops"] = cost_analysis_flops(compiled)
  return out


def compile_or_verdict(lowered, argument_bytes: float, dump_hlo: str | None = None) -> tuple[object | None, dict]:
  """(compiled, figures); when the TPU compiler refuses for lack of memory, (None, its verdict):
  {oom, temp_bytes (what it needed for temporaries), available_bytes, peak_bytes (arguments + that)};
  for lack of pinned host memory (offloaded activations), {oom, memory_space: "host", host_temp_bytes,
  host_available_bytes}, with the device figures NaN.
  ``dump_hlo``: also write the optimised HLO text to this file."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError; only RESOURCE_EXHAUSTED becomes a verdict
    parsed = topology.parse_oom(str(e))
    host = topology.parse_host_oom(str(e)) if parsed is None else None
    if host is not None:  # device memory is not known then: the compiler stopped at the host's limit
      return None, {"oom": True, "memory_space": "host", "host_temp_bytes": host[0], "host_available_bytes": host[1],
                    "temp_bytes": float("nan"), "peak_bytes": float("nan"), "message": str(e).splitlines()[0][:400]}
    if parsed is None:
      raise
    needed, available = parsed
    return None, {"oom": True, "temp_bytes": needed, "available_bytes": available,
                  "peak_bytes": argument_bytes + needed, "message": str(e).splitlines()[0][:400]}
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(compiled.as_text())
  return compiled, compiled_figures(compiled)


# ------------------------------------------------------------------------------------ devices


def _accelerator_possible() -> bool:
  """Whether JAX could start on a GPU or TPU here (a GPU plugin installed, or a TPU device node)."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu" or jax.config.jax_platforms == "cpu":
    return False
  from importlib import metadata  # noqa: PLC0415

  names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
  gpu = any(n.startswith(("jax-cuda", "jax-rocm")) and n.endswith("plugin") for n in names)
  return gpu or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def topology_devices(name: str, count: int):
  """The first ``count`` compile-only devices of ``--topology`` (TPU slice or NVIDIA GPUs); a mesh larger
  than the topology is refused."""
  devices = topology.gpu_devices(name) if topology.is_gpu_topology(name) else topology.tpu_devices(name)
  if count > len(devices):
    raise ValueError(f"the mesh needs {count} devices but --topology {name} has {len(devices)}; "
                     f"choose a larger topology or a smaller --mesh")
  return devices[:count] if count else devices


def target_devices(args, count: int):
  """The devices to compile for: a TPU slice or GPU host (``--topology``), simulated CPU devices
  (``--simulate``, or by itself when the mesh needs more devices than this CPU-only host has), or this host's."""
  if getattr(args, "topology", None):
    return topology_devices(args.topology, count)
  from jax._src import xla_bridge  # noqa: PLC0415  (the only way to ask without starting a backend)

  started = xla_bridge.backends_are_initialized()
  if not started and (args.simulate or not _accelerator_possible()):
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(count, 1))
    # XLA:CPU has no bf16 dot: it converts the operands to f32, and loop-invariant code motion then
    # hoists the conversion of a whole stacked operand out of the layer scan: an f32 copy of every
    # bf16 weight (serving) or of the saved residual stack (training backward), which no GPU or TPU
    # program holds. Without the pass the simulated program converts one layer's slice at a time.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_disable_hlo_passes" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_disable_hlo_passes=while-loop-invariant-code-motion".strip()
  devices = jax.devices()
  if count > len(devices):
    raise ValueError(f"the mesh needs {count} devices but {len(devices)} {devices[0].platform} device(s) are "
                     f"available; add --simulate to compile for {count} simulated CPU devices (run it in a "
                     f"fresh process), or --topology for a TPU slice or GPU host")
  return devices[:count] if count else devices


def model_config(args, **overrides) -> MixtralConfig:
  cf = None if str(args.capacity_factor).lower() in ("none", "null", "dropless") else float(args.capacity_factor)
  fields = dict(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, capacity_factor=cf,
                moe_impl=args.moe_impl, **overrides)
  fields["attention_impl"] = args.attention
  return get_config(args.preset, **fields)


def fit_lines(peak_bytes: float, device: tuple[str, float] | None, tips: list[str]) -> tuple[list[str], dict | None]:
  """The ``--device`` verdict in words, and its JSON record."""
  if device is None:
    return [], None
  name, usable = device
  peak = peak_bytes / GiB
  fits = peak <= usable
  lines = [f"device {name}: {usable:.2f} GiB usable per device"
           + (f" (with XLA_PYTHON_CLIENT_MEM_FRACTION={topology.GPU_MEM_FRACTION}; JAX's default .75 leaves "
              f"{usable / topology.GPU_MEM_FRACTION * 0.75:.1f} GiB)" if name in ("h100", "h200") else "")]
  if fits:
    lines.append(f"  fits: peak {peak:.2f} GiB is {100 * peak / usable:.0f}% of it ({usable - peak:.2f} GiB spare)")
  else:
    lines.append(f"  does not fit: needs {peak:.2f} GiB of {usable:.2f} GiB ({peak / usable:.2f}x). To fit, try:")
    lines += [f"    - {t}" for t in tips]
  return lines, {"name": name, "usable_bytes": usable * GiB, "fits": fits}


def compiler_label(args, mesh) -> str:
  """Which compiler made the figures: the target's own (TPU compiler, XLA:GPU deviceless), this host's
  devices, or XLA:CPU standing in for the target (simulation: CPU layouts and fusion, no GPU/TPU kernels)."""
  device = mesh.devices.flat[0]
  if getattr(args, "topology", None):
    compiler = "XLA:GPU, deviceless" if device.platform == "gpu" else "TPU compiler"
    return f"{device.device_kind}, {compiler}, {args.topology}"
  if device.platform == "cpu" and mesh.size > 1:
    return f"{device.device_kind}: XLA:CPU simulation, not the GPU/TPU compiler"
  return device.device_kind


def header(args, cfg, mesh, extra: str) -> str:
  return (f"{args.preset} on {format_mesh(mesh)} ({mesh.size} x {compiler_label(args, mesh)}), {extra}, "
          f"{cfg.dtype} compute, {cfg.param_dtype} params, capacity factor {cfg.capacity_factor or 'dropless'}")


def kernel_lines(figures: dict, ragged: bool = True) -> list[str]:
  """The kernels ``hlo_stats`` found, in words (their FLOPs are not in the HLO count); ``ragged``: with
  the count of ragged all-to-alls."""
  lines = [f"  kernel: {name}: {n} per program (its FLOPs are not in the HLO count)"
           for name, n in figures.get("kernels", {}).items()]
  if ragged and figures.get("ragged_all_to_all_ops"):
    lines.append(f"  kernel: ragged all-to-all: {figures['ragged_all_to_all_ops']} per program")
  return lines


