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
* Inside ``shard_map`` (the expert-parallel dispatch) with ``check_vma`` on, Pallas refuses output
  shapes that do not say over which manual mesh axes they vary, and tokamax's do not.
  :func:`per_device` runs a kernel with that check off and types its outputs as varying over every
  axis its inputs vary over (what a per-device computation is). Only for calls inside a
  ``jax.custom_vjp`` whose backward is again such a call: the retyping is never transposed.
"""

from __future__ import annotations

import contextlib
import logging

import jax


def load():
  """The ``tokamax`` module, its absl flags marked parsed (see the module docstring)."""
  from absl import flags  # noqa: PLC0415
  import tokamax  # noqa: PLC0415
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  # Every kernel traced without a tuned config logs "Autotuning cache miss ..." (a screenful per step on
  # a deviceless compile, where nothing can be autotuned); the default config is what runs. Keep it quiet.
  logging.getLogger("absl").addFilter(_NoAutotuneMiss())
  return tokamax


class _NoAutotuneMiss(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Autotuning cache miss")

  def __eq__(self, other):  # one filter however often load() runs (Filterer.addFilter skips equals)
    return isinstance(other, _NoAutotuneMiss)

  __hash__ = object.__hash__


def cross_compiling(gpu_kernel: bool):
  """Context for tracing a tokamax GPU kernel: ``cross_compile`` when the process has no GPU."""
  if gpu_kernel and jax.default_backend() != "gpu":
    return load().config.cross_compile(True)
  return contextlib.nullcontext()


def per_device(fn, *arrays):
  """``fn(*arrays)`` (a tokamax kernel call); inside ``shard_map``, run as the module docstring says:
  inputs and outputs typed as varying over every manual axis any input varies over."""
  axes = frozenset().union(*(jax.typeof(a).mat.varying for a in arrays))
  if not axes:
    return fn(*arrays)
  vary = lambda a: a if axes <= jax.typeof(a).mat.varying else jax.lax.pcast(  # noqa: E731
      a, tuple(sorted(axes - jax.typeof(a).mat.varying)), to="varying")
  arrays = tuple(map(vary, arrays))  # before the switch: under it pcast does not retype
  from jax._src import config as jax_config  # noqa: PLC0415  (no public switch for one call)
  with jax_config._check_vma(False):  # noqa: SLF001
    out = fn(*arrays)
  return jax.tree.map(vary, out)


def cotangent_for(ct, primal):
  """Inside ``shard_map``: ``ct`` summed over the mesh axes it varies over and ``primal`` does not (the
  transpose of the implicit broadcast that made an invariant primal's uses vary)."""
  extra = jax.typeof(ct).mat.varying - jax.typeof(primal).mat.varying
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct
