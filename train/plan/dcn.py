"""Which collectives of a compiled multi-slice program cross the data-center network (DCN), and how many
bytes they carry, against the ideal.

Two forms of program, both handled:

* The TPU compiler's multi-slice program (checked with libtpu 0.0.42) is one slice's module: its
  ``num_partitions`` is the devices of one slice, every replica group is slice-local (on-chip links,
  ICI), and what crosses slices is a host-transfer ``send``/``recv`` pair for the Megascale runtime,
  tagged ``_xla_megascale_transfer_type="ALL_REDUCE"`` (or another collective). ``hlo_stats`` records
  each such send as op ``dcn-all-reduce`` etc.
* A flat program over all devices (XLA:GPU or XLA:CPU over several hosts): partition ``i`` runs on
  ``mesh.devices.flat[i]`` (``jit`` takes its device assignment from the mesh in that order), so
  :func:`partition_slices` gives each partition's slice, and a collective crosses when one of its
  replica groups (or, for a ``collective-permute``, one source-target pair) holds two slices.

Bytes are counted per device as the operand bytes each device puts into a crossing collective,
weighted by how often its computation runs (``hlo_stats``'s trip counts). The ideal for data
parallelism over slices is one reduction of the gradients across slices: every device contributes its
shard of the trainable parameters' gradients once (the bytes of its parameter shard, in the parameters'
dtype, and, since XLA may reduce gradients in the compute dtype before converting them, also in that
dtype). ``dcn_bytes / dcn_ideal_bytes`` is 1.0 when nothing else crosses; a gather of weights or an
expert all-to-all over DCN shows up as more, and as ``ops`` other than all-reduce/reduce-scatter.
"""

from __future__ import annotations

import re

import numpy as np

_IOTA = re.compile(r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")


def parse_groups(text: str) -> list[list[int]]:
  """``{{0,1},{2,3}}`` or the iota form ``[2,2]<=[4]`` / ``[2,2]<=[2,2]T(1,0)`` -> [[0, 1], [2, 3]]."""
  m = _IOTA.fullmatch(text.strip())
  if m:
    shape = [int(x) for x in m.group(1).split(",")]
    ids = np.arange(int(np.prod([int(x) for x in m.group(2).split(",")]))).reshape(
        [int(x) for x in m.group(2).split(",")])
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(shape).tolist()
  return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9, ]*)\}", text)]


def partition_slices(mesh) -> list[int]:
  """The slice of each partition id of a program compiled for ``mesh``."""
  return [int(getattr(d, "slice_index", 0) or 0) for d in mesh.devices.flat]


def crosses(groups: list[list[int]], slices: list[int]) -> bool:
  """Whether a group holds partitions of more than one slice (an empty group list means all partitions)."""
  if not groups or not any(groups):
    return len(set(slices)) > 1
  return any(len({slices[i] for i in g}) > 1 for g in groups)


def dcn_traffic(collectives: list[dict], slices: list[int], num_partitions: int | None = None) -> dict:
  """{dcn_bytes, ops: {op: count per step} crossing DCN, crossing: [names]} over ``hlo_stats``'s
  collectives; ``num_partitions`` below ``len(slices)`` marks a one-slice module (replica groups local)."""
  local = num_partitions is not None and num_partitions < len(slices)
  total, ops, names = 0, {}, []
  for c in collectives:
    if c["op"].startswith("dcn-") or (not local and crosses(parse_groups(c["groups"]), slices)):
      total += c["weight"] * c["bytes"]
      ops[c["op"]] = ops.get(c["op"], 0) + c["weight"]
      names.append(c["name"])
  return {"dcn_bytes": float(total), "ops": ops, "crossing": names}


def dcn_lines(figures: dict, ideal: float, ideal_compute: float, param_dtype: str, dtype: str) -> list[str]:
  """The DCN figures in words: against the ideal with gradients in the parameters' dtype, and in the
  compute dtype (XLA may reduce bf16 gradients before converting them: at 8x7B it does)."""
  got = figures["dcn_bytes"]
  ops = ", ".join(f"{op} x{n}" for op, n in sorted(figures["ops"].items())) or "none"
  ratio = lambda i: f"{got / i:.3f}x" if i else "n/a"  # noqa: E731
  return [f"  DCN bytes per step per device: {got / 2**30:.3f} GiB; ideal (one cross-slice gradient reduction) "
          f"{ideal / 2**30:.3f} GiB in {param_dtype} = {ratio(ideal)}, {ideal_compute / 2**30:.3f} GiB in {dtype} "
          f"= {ratio(ideal_compute)}",
          f"  collectives crossing slices per step: {ops}"]
