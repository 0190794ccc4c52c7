"""The paged KV cache's default size: what ``mixtral-jax serve`` takes without ``--kv-cache-gib``.

The pool of pages is held whole on every device of the mesh (it is not sharded), so the budget is per
device, and the device with the least room sets it. Two cases:

  * The devices report memory (GPU, TPU: ``device.memory_stats()`` has ``bytes_limit`` and
    ``bytes_in_use``). As vLLM's ``--gpu-memory-utilization``, the cache takes
    ``utilization x bytes_limit - bytes_in_use``, measured once the weights are loaded, on the device
    where that is smallest. The other ``1 - utilization`` of the limit is left for the prefill and decode
    programs' temporaries, which compile later. (On GPU, ``bytes_limit`` is JAX's allocator limit:
    ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the card, 0.75 unless set.)
  * They do not (CPU: ``memory_stats()`` is None, and nothing says what the host has free). The cache
    takes what fixed rows reserve, ``max_batch x max_context`` tokens of keys and values in every
    layer, so the paged default holds no more memory than the fixed rows did; but never less than one
    ``max_context`` request plus the null page (``max_batch`` 1 would otherwise fall a page short).

Either way a budget below one ``max_context`` request plus the null page is refused in one line with
the arithmetic (:func:`default_cache_bytes`).
"""

from __future__ import annotations

import dataclasses
import math

DEFAULT_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
  """One device's allocator figures, in bytes: its limit and what is in use now."""
  name: str
  limit: int
  in_use: int


@dataclasses.dataclass(frozen=True)
class CacheBudget:
  """The cache's bytes per device and how they were chosen (printed at start-up)."""
  bytes: int
  how: str

  @property
  def gib(self) -> float:
    return self.bytes / GiB  # exact: a division by a power of two


def device_memory(devices) -> list[DeviceMemory] | None:
  """Each device's ``memory_stats()`` limit and use; None when any device reports none (CPU)."""
  out = []
  for d in devices:
    stats = d.memory_stats()
    if not stats or "bytes_limit" not in stats:
      return None
    out.append(DeviceMemory(f"{d.platform}:{d.id}", int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))))
  return out


def default_cache_bytes(memory: list[DeviceMemory] | None, *, utilization: float, per_token: int, max_batch: int,
                        max_context: int, page_size: int) -> CacheBudget:
  """The default KV-cache budget per device (see the module docstring). Steps:

  1. ``per_token``: the cache bytes of one token, keys and values of every layer
     (:func:`~mixtral_jax.inference.pages.bytes_per_token`); a page holds ``page_size`` tokens;
  2. the least the cache may be: the pages of one ``max_context`` request plus the null page;
  3. with ``memory``: ``min over devices (utilization x limit - in_use)``; without (CPU): the fixed
     rows' ``max_batch x max_context`` tokens, raised to step 2's floor;
  4. a budget from step 3 below step 2's floor is a ValueError naming the numbers and the fixes.
  """
  floor_pages = math.ceil(max_context / page_size) + 1
  floor = floor_pages * page_size * per_token
  if memory is None:
    fixed = max_batch * max_context * per_token
    return CacheBudget(max(fixed, floor), f"the fixed rows' {max_batch} x {max_context} tokens (the devices report "
                                          "no free memory; --kv-cache-gib sets it)")
  tight = min(memory, key=lambda m: utilization * m.limit - m.in_use)
  room = int(utilization * tight.limit - tight.in_use)
  how = (f"--memory-utilization {utilization:g} x {tight.limit / GiB:.2f} GiB limit - {tight.in_use / GiB:.2f} GiB in "
         f"use on {tight.name}")
  if room < floor:
    raise ValueError(
        f"the KV cache gets {room / GiB:.3f} GiB ({how}), but one --max-context {max_context} request needs "
        f"{floor / GiB:.3f} GiB ({floor_pages - 1} pages of {page_size} tokens plus the null page, "
        f"{per_token / 1024:g} KiB per token); raise --memory-utilization, lower --max-context, quantize the weights "
        "(--quantize int8), or use more devices")
  return CacheBudget(room, how)
