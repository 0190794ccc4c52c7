"""Multi-process start-up (JAX's own runtime, ``jax.distributed``) and each process's share of a batch.

``initialize`` resolves every argument from, in order: the call (CLI flags), the environment
(``MIXTRAL_COORDINATOR`` / ``JAX_COORDINATOR_ADDRESS``, ``MIXTRAL_NUM_PROCESSES`` / ``JAX_NUM_PROCESSES``,
``MIXTRAL_PROCESS_ID`` / ``JAX_PROCESS_ID``, ``MIXTRAL_LOCAL_DEVICES``), and finally JAX's cluster
auto-detection (Cloud TPU pods, Slurm, Open MPI), used when the environment shows such a cluster with
more than one process. With none of these, or one process, it does nothing: single-host runs need no
set-up. CPU devices of several processes talk through JAX's gloo collectives (its default,
``jax_cpu_collectives_implementation``), so processes on one machine (127.0.0.1) run the same programs
as accelerator hosts.
"""

from __future__ import annotations

import os

import jax

_ENV = {
    "coordinator": ("MIXTRAL_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("MIXTRAL_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("MIXTRAL_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_count": ("MIXTRAL_LOCAL_DEVICES",),
}
# Environment variables through which a multi-process cluster announces its size to JAX's detection.
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _from_env(name: str):
  for var in _ENV[name]:
    if os.environ.get(var):
      return os.environ[var]
  return None


def _cluster_detected() -> bool:
  if any(int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_SIZE_ENV):
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")  # set on multi-host Cloud TPU VMs
  # Multi-slice Cloud TPU (even of one host per slice) announces its slices to JAX's detection here.
  slices = int(os.environ.get("MEGASCALE_NUM_SLICES", "1") or 1)
  return len([h for h in hosts.split(",") if h]) > 1 or slices > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_count: int | None = None) -> bool:
  """Starts ``jax.distributed`` when this is one of several processes. Returns whether it did.

  Must run before any JAX computation. ``coordinator`` is ``host:port`` of process 0 (``127.0.0.1:PORT``
  for processes on one machine); ``local_device_count`` sets how many CPU devices this process
  simulates (tests; ignored on accelerators).
  """
  coordinator = coordinator or _from_env("coordinator")
  num_processes = int(num_processes if num_processes is not None else _from_env("num_processes") or 0) or None
  process_id = process_id if process_id is not None else _from_env("process_id")
  process_id = None if process_id is None else int(process_id)
  local_device_count = local_device_count or _from_env("local_device_count")

  if local_device_count:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  if jax.distributed.is_initialized():
    return True
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if explicit:
    if num_processes == 1:
      return False
    missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
      raise ValueError(
          f"multi-process start-up needs coordinator, num_processes and process_id; missing {', '.join(missing)} "
          f"(flags, or the environment variables {', '.join(_ENV[missing[0]])})")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
  elif not _cluster_detected():
    return False
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True


def process_batch_slice(global_batch: int, sharding: jax.sharding.Sharding | None = None, *,
                        global_shape: tuple[int, ...] | None = None) -> slice:
  """The rows ``[start, stop)`` of a global batch (axis 0) that this process must feed.

  With a ``sharding`` (of an array of ``global_shape``, default ``(global_batch,)``), the rows its local
  devices hold: the whole batch when the batch axis is replicated across processes. Without one, an even
  split by process index. Pass the local rows to ``jax.make_array_from_process_local_data``.
  """
  P, p = jax.process_count(), jax.process_index()
  if sharding is None:
    if global_batch % P:
      raise ValueError(f"a global batch of {global_batch} does not split over {P} processes; "
                       f"use a multiple of {P}")
    per = global_batch // P
    return slice(p * per, (p + 1) * per)
  shape = global_shape or (global_batch,)
  rows = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[0].indices(global_batch)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(f"this process's rows of the batch are not contiguous under {sharding}; "
                     "order the mesh so each process's devices hold one block of the batch")
  return slice(start, stop)
