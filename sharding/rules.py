"""Sharding as data: the one table that maps logical axis names to mesh axes.

Parameters carry logical axis names from creation (``nnx.Param(..., logical_axes=(...))``); activations
are pinned with :func:`constrain` at block boundaries. Nothing else in the package names a mesh axis,
except the expert-parallel ``shard_map``, which owns the ``expert`` axis by construction.

Mesh axes: ``data`` (pure data parallel; on several slices its outer part is the ``dcn_data`` of the
mesh spec, merged into this axis by ``sharding.mesh``, so ``batch`` splits over slices with no rule of
its own), ``fsdp`` (data parallel with parameters sharded),
``expert`` (experts split across devices; the batch is split over it too outside the MoE block),
``tensor`` (Megatron-style split of heads and FFN width).

Outside the MoE block ``expert`` is one more data-parallel axis, so the dense weights (embedding,
attention, router, norms, LM head) split their ``embed`` dimension over ``fsdp`` *and* ``expert``
(ZeRO-3 style, as MaxText's ``embed`` rule does): on ``expert=8`` every device holds 1/8 of every
weight instead of a full copy of the dense ones. They are all-gathered per layer for use, like FSDP.
Expert weights keep ``expert_embed`` on ``fsdp`` only, since ``expert`` already splits them by expert.

We use ``AxisType.Auto`` meshes (classic GSPMD propagation). Explicit axis types would need an
``out_sharding`` on every contraction over a sharded axis outside ``shard_map``; with Auto, the table
plus a constraint per block boundary is enough, and the one place where placement matters for
performance (token dispatch to experts) is written by hand in ``shard_map``.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

# logical axis -> mesh axes it is split over, in order. Mesh axes of size 1 are harmless.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("seq", ()),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_vocab", ("tensor",)),
    # parameters
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp", "expert")),  # ZeRO-style: dense weights split over every batch-parallel axis
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("norm", ("fsdp", "expert")),
    ("experts", ("expert",)),
    ("router_experts", ()),
    ("expert_embed", ("fsdp",)),
    ("expert_mlp", ("tensor",)),
    ("lora_rank", ()),  # LoRA adapters' rank: never split
)

_RULES = dict(LOGICAL_RULES)


def logical_to_spec(axes: Sequence[str | None], mesh: jax.sharding.Mesh | None = None) -> P:
  """Maps logical axis names to a ``PartitionSpec`` through :data:`LOGICAL_RULES`.

  A mesh axis is used at most once per spec (first logical axis wins), and, when ``mesh`` is given,
  mesh axes of size 1 or absent from the mesh are dropped so specs stay readable.
  """
  used: set[str] = set()
  out = []
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in _RULES:
      raise KeyError(f"logical axis {name!r} is not in sharding.rules.LOGICAL_RULES")
    mesh_axes = []
    for m in _RULES[name]:
      if m in used:
        continue
      if mesh is not None and (m not in mesh.shape or mesh.shape[m] == 1):
        continue
      mesh_axes.append(m)
      used.add(m)
    out.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
  return P(*out)


def logical_sharding(axes: Sequence[str | None], mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical names under the current mesh; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh))
