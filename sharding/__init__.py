"""Device mesh, the logical-axis table, and the expert-parallel collective. Knows nothing of the model."""

from .rules import (
    LOGICAL_RULES,
    logical_to_spec,
    logical_sharding,
    constrain,
)

__all__ = ["LOGICAL_RULES", "logical_to_spec", "logical_sharding", "constrain"]
from .mesh import MESH_AXES, format_mesh, make_mesh, parse_mesh  # noqa: E402

__all__ += ["MESH_AXES", "format_mesh", "make_mesh", "parse_mesh"]
