"""tokamax (the JAX team's Pallas kernel library) as our GPU kernels use it: imported on first use, with
two things set right for this project.

* tokamax reads its options through absl flags and, on the first read, parses ``sys.argv`` as absl
  flags when nobody has; our CLI's and pytest's arguments are not absl flags, so that parse fails
  ("Unknown command line flag"). We mark the flags parsed first, leaving every tokamax option at its
  default.
* tokamax checks the *default device's* hardware before running a GPU kernel. When the program is
  compiled for GPUs that are not this process's devices (a deviceless compile on a CPU host, through
  ``jax.experimental.topologies``), that check looks at the CPU; :func:`cross_compiling` tells tokamax
  so. On a real GPU it is a no-op.
"""

from __future__ import annotations

import contextlib

import jax


def load():
  """The ``tokamax`` module, its absl flags marked parsed (see the module docstring)."""
  from absl import flags  # noqa: PLC0415
  import tokamax  # noqa: PLC0415
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def cross_compiling(gpu_kernel: bool):
  """Context for tracing a tokamax GPU kernel: ``cross_compile`` when the process has no GPU."""
  if gpu_kernel and jax.default_backend() != "gpu":
    return load().config.cross_compile(True)
  return contextlib.nullcontext()
