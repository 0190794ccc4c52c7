"""Target hardware for ``mixtral-jax plan``: TPU slices and NVIDIA GPU hosts as compile-only devices,
and device memory.

Cloud TPU type names count differently per generation: ``v4-N`` and ``v5p-N`` count TensorCores
(2 per chip, so ``v5p-128`` is 64 chips), ``v5litepod-N`` / ``v5e-N`` and ``v6e-N`` count chips.
:func:`tpu_topology` turns one into the TPU compiler's topology string (``v5p-128`` -> ``v5p:4x4x4``),
and :func:`tpu_devices` gives that slice's devices from ``jax.experimental.topologies`` (libtpu must be
installed; no TPU is needed: ``jit(...).lower(...).compile()`` on a mesh of them runs the real TPU
compiler on this host).

GPU targets are ``[hosts x]card[xGPUs]`` (``h100x8``, ``h200x8``, ``2xh100x8``, ``h100``):
:func:`gpu_devices` reads the card's ``GpuTargetConfigProto`` (``mixtral_jax/gpu_targets/*.txtpb``, made
from XLA's spec files) and asks the CUDA plugin for ``1 x hosts x GPUs`` compile-only devices, so XLA:GPU
compiles deviceless on this host (no GPU, no autotuning: memory and HLO are real, timings are not).

:data:`DEVICE_MEMORY` holds the memory a program may use per device, for the verdict of ``--device``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from importlib import resources

GiB = 2**30

# Chips per slice -> the compiler's chip grid. 3D tori (v4, v5p) grow z, then y, then x; 2D (v5e, v6e)
# grow y then x, as Cloud TPU's own slice shapes.
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# Cloud name prefix -> (compiler generation name, TensorCores counted per chip in the name, grid table)
_GENERATIONS = {"v4": ("v4", 2, _GRID_3D), "v5p": ("v5p", 2, _GRID_3D), "v5e": ("v5e", 1, _GRID_2D),
                "v5litepod": ("v5e", 1, _GRID_2D), "v6e": ("v6e", 1, _GRID_2D)}

# Usable memory per device in GiB. TPU: what the TPU compiler itself reports as available HBM
# (libtpu 0.0.42; v4's figure is per chip, two TensorCores). GPU: the card's memory as CUDA reports
# it, times 0.95: the share JAX may take with XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (its default is .75).
GPU_MEM_FRACTION = 0.95
DEVICE_MEMORY = {"v5p": 95.74, "v5e": 15.75, "v6e": 31.25, "v4": 30.5,
                 "h100": 79.6 * GPU_MEM_FRACTION, "h200": 140.4 * GPU_MEM_FRACTION}


def tpu_topology(name: str) -> str:
  """``v5p-128`` -> ``v5p:4x4x4``; a compiler string such as ``v5p:2x2x1`` passes through."""
  name = name.strip().lower()
  if ":" in name:
    return name
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"--topology {name!r}: expected a Cloud TPU type such as v5p-128, v4-32, v5litepod-16, "
                     f"v6e-64, or a compiler topology such as v5p:4x4x4")
  gen, per_chip, grids = _GENERATIONS[m.group(1)]
  count = int(m.group(2))
  if count % per_chip or count // per_chip not in grids:
    sizes = ", ".join(f"{m.group(1)}-{c * per_chip}" for c in grids)
    raise ValueError(f"--topology {name!r}: no such slice; {m.group(1)} slices are {sizes}"
                     + (" (the number counts TensorCores, 2 per chip)" if per_chip == 2 else ""))
  return f"{gen}:{grids[count // per_chip]}"


def tpu_slices(name: str) -> tuple[int, str]:
  """``2xv5p-128`` -> (2, "v5p-128"): several slices joined by DCN; ``v5p-128`` -> (1, "v5p-128")."""
  m = re.fullmatch(r"(\d+)x(.+)", name.strip().lower())
  if m is None:
    return 1, name
  if int(m.group(1)) < 1:
    raise ValueError(f"--topology {name!r}: the slice count must be at least 1")
  return int(m.group(1)), m.group(2)


def tpu_devices(name: str):
  """The devices of a TPU slice, or of ``N`` slices (``2xv5p-128``: each device has a ``slice_index``),
  for ahead-of-time compilation on any host with libtpu."""
  num_slices, name = tpu_slices(name)
  topology = tpu_topology(name)
  # libtpu looks for a TPU and its workers on start-up; these keep it quiet on a host without one.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.split(":")[0] + "-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compiling needs no TPU, so another process holding libtpu (a second plan, a test run) must not
  # block this one with libtpu's single-process lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415

  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices).devices)
  except Exception as e:  # noqa: BLE001 - no libtpu, or a topology it does not know
    raise ValueError(f"cannot get TPU topology {topology!r} ({str(e).splitlines()[0][:200]}); "
                     f"install the TPU compiler with pip install 'jax[tpu]' (libtpu) matching jax") from None


# --------------------------------------------------------------------------------- NVIDIA GPUs

# Card name in --topology -> (target config file in mixtral_jax/gpu_targets, the device_kind it yields).
GPU_CARDS = {"h100": ("h100_sxm.txtpb", "NVIDIA H100 80GB HBM3"), "h200": ("h200.txtpb", "NVIDIA H200 141GB HBM3e")}
_GPU_NAME = re.compile(r"(?:(\d+)x)?([a-z]+\d+)(?:x(\d+))?")


def is_gpu_topology(name: str | None) -> bool:
  """Whether ``--topology`` names NVIDIA GPUs (``h100x8``, ``2xh200x8``) rather than a TPU slice."""
  m = _GPU_NAME.fullmatch((name or "").strip().lower())
  return bool(m) and not m.group(2).startswith("v")


def parse_gpu_topology(name: str) -> tuple[int, str, int]:
  """``2xh100x8`` -> (2 hosts, "h100", 8 GPUs per host); ``h100x4`` -> (1, "h100", 4); ``h200`` -> (1, "h200", 1)."""
  m = _GPU_NAME.fullmatch(name.strip().lower())
  if m is None:
    raise ValueError(f"--topology {name!r}: expected [hosts x]card[xGPUs] such as h100x8, 2xh100x8, h200x8")
  if m.group(2) not in GPU_CARDS:
    raise ValueError(f"--topology {name!r}: unknown GPU {m.group(2)!r}; known cards: {', '.join(GPU_CARDS)}")
  hosts, gpus = int(m.group(1) or 1), int(m.group(3) or 1)
  if hosts < 1 or gpus < 1:
    raise ValueError(f"--topology {name!r}: hosts and GPUs per host must be at least 1")
  return hosts, m.group(2), gpus


def gpu_target_config(card: str) -> str:
  """The card's GpuTargetConfigProto text (shipped with the package)."""
  return (resources.files("mixtral_jax") / "gpu_targets" / GPU_CARDS[card][0]).read_text()


def gpu_devices(name: str):
  """Compile-only devices of ``hosts x GPUs`` NVIDIA cards, from the CUDA plugin (no GPU needed)."""
  hosts, card, gpus = parse_gpu_topology(name)
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    import jax  # noqa: PLC0415

    raise ValueError(f"--topology {name}: compiling for NVIDIA GPUs needs JAX's CUDA plugin; install it with "
                     f'pip install "jax[cuda12]=={jax.__version__}"')
  import jax  # noqa: PLC0415
  from jax._src import xla_bridge  # noqa: PLC0415  (the only way to ask without starting a backend)
  from jax.experimental import topologies  # noqa: PLC0415

  # With no GPU here the plugin's start-up check (cuInit) fails unless JAX's own backend is the CPU; the
  # plugin still makes compile-only devices for the target.
  if not xla_bridge.backends_are_initialized() and not os.path.exists("/dev/nvidiactl"):
    jax.config.update("jax_platforms", "cpu")
  try:
    desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(card),
                                        topology=f"1x{hosts}x{gpus}")
  except Exception as e:  # noqa: BLE001 - the plugin failed to start, or refuses the target config
    raise ValueError(f"--topology {name}: the CUDA plugin cannot make compile-only devices "
                     f"({str(e).splitlines()[0][:200]}); on a host without a GPU run with JAX_PLATFORMS=cpu "
                     f"in a fresh process") from None
  return list(desc.devices)


def device_memory(spec: str | None, devices=None) -> tuple[str, float] | None:
  """(name, usable GiB per device) for ``--device h100|h200|v5p|v5e|v6e|v4|<GiB>``; with no spec, the
  card of ``devices`` when they are TPU or known NVIDIA compile-only devices, else None."""
  if spec is None:
    kind = devices[0].device_kind.lower() if devices and devices[0].platform in ("tpu", "gpu") else ""
    gpu = [card for card, (_, k) in GPU_CARDS.items() if k.lower() == kind]
    if gpu:
      return gpu[0], DEVICE_MEMORY[gpu[0]]
    spec = {"tpu v5": "v5p", "tpu v5p": "v5p", "tpu v5 lite": "v5e", "tpu v6 lite": "v6e", "tpu v4": "v4"}.get(kind)
    if spec is None:
      return None
    if spec == "v4":  # the compiler's v4 devices are single TensorCores: half a chip's HBM
      return "v4 TensorCore", DEVICE_MEMORY["v4"] / 2
  key = spec.strip().lower()
  if key in DEVICE_MEMORY:
    return key, DEVICE_MEMORY[key]
  try:
    return f"{float(key):g} GiB", float(key)
  except ValueError:
    raise ValueError(f"--device {spec!r}: expected one of {', '.join(DEVICE_MEMORY)} or a size in GiB "
                     f"such as 80") from None


_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> tuple[float, float] | None:
  """(needed, available) bytes from the TPU compiler's RESOURCE_EXHAUSTED message, or None.

  Two forms are known: "... memory required for HLO temporaries (217.32G) exceeds available HBM
  (95.74G)" and "Used 130.29G of 95.74G hbm"; XLA writes sizes in binary units (G = GiB)."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  size = lambda v, u: float(v) * _UNITS[u]
  m = re.search(r"\(" + _SIZE + r"\)\s*exceeds available HBM\s*\(" + _SIZE + r"\)", message)
  if m is None:
    m = re.search(r"Used\s+" + _SIZE + r"\s+of\s+" + _SIZE + r"\s+hbm", message)
  if m is None:
    return None
  return size(m.group(1), m.group(2)), size(m.group(3), m.group(4))


def parse_host_oom(message: str) -> tuple[float, float] | None:
  """(needed, available) bytes of pinned host memory per device from the TPU compiler's refusal of a
  program whose offloaded activations exceed the host memory it models ("Ran out of memory in memory
  space host. Used 184.00G of 128.00G host."), or None."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  m = re.search(r"memory space host\.\s*Used\s+" + _SIZE + r"\s+of\s+" + _SIZE + r"\s+host", message)
  return None if m is None else (float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)])


def advice(peak_gib: float, usable_gib: float, *, mesh_sizes: dict, remat: str, grad_accum: int, batch: int,
           serving: bool = False) -> list[str]:
  """What a user can change when a program does not fit, in the order we would try them."""
  ratio = peak_gib / usable_gib
  tips = []
  if serving:
    tips.append("serve on more devices (a larger fsdp or expert axis splits the weights and the KV cache)")
    tips.append("a smaller --batch or context: the KV cache and the prefill's activations scale with both")
    tips.append("quantized weights (int8 halves the bf16 weights)")
    return tips
  if remat == "none":
    tips.append("--remat full: recompute each layer in the backward instead of keeping its activations")
  shards = math.prod(v for k, v in mesh_sizes.items() if k in ("fsdp", "expert"))
  tips.append(f"more fsdp (the weights and optimizer state split over fsdp x expert = {shards} devices now); "
              f"fewer data replicas")
  if batch // max(grad_accum, 1) > 1:
    tips.append(f"--grad-accum {2 * grad_accum}: halves the activations of each microbatch, same global batch")
  tips.append("a smaller --batch or --seq")
  tips.append("LoRA (train adapters only: no fp32 master weights or AdamW moments for the frozen weights)")
  if ratio > 4:
    tips.append(f"the peak is {ratio:.1f}x the device: more devices are needed, not just a setting")
  return tips
