"""``mixtral-jax plan``: will it fit? Train and serving programs compiled ahead of time, from shapes alone,
for this host's devices, simulated CPU devices, or a target's compile-only devices (TPU slice, NVIDIA GPUs).

Modules, imported one way (``commands`` -> ``training``/``serving`` -> ``compiling`` -> ``topology``,
``hlo_stats``): ``commands`` (the CLI), ``training`` (the train step's plan and its analytic side),
``serving`` (prefill and decode), ``compiling`` (devices, compile-or-verdict, figures, report helpers),
``topology`` (TPU slices, GPU targets, device memory), ``hlo_stats`` (FLOPs, collectives and kernels from
optimised HLO text).
"""

from . import compiling, topology  # noqa: F401
from .commands import plan_example, plan_main, plan_parser  # noqa: F401
from .compiling import compile_or_verdict, shard_bytes  # noqa: F401
from .hlo_stats import hlo_stats  # noqa: F401
from .serving import plan_serving  # noqa: F401
from .training import analytic, plan  # noqa: F401
