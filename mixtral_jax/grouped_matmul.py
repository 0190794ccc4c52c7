"""The grouped matmul under the dropless expert kernels: ``x_MK @ w_GKN`` with rows in G contiguous groups.

``out[r] = x[r] @ w[g]`` for the rows ``r`` of group ``g`` (groups packed from row 0 in order, sizes
``sizes_G``; rows past them give zero). Kernels (``KERNELS``):

  lax         ``jax.lax.ragged_dot``. On TPU, XLA's own Mosaic grouped matmul (exact FLOPs); on CPU a slow
              reference. On GPU, XLA expands it into one dense dot over a masked copy of x for *every*
              group (G times the FLOPs; checked with a deviceless H100 compile), so it is refused there.
  triton      ``tokamax.ragged_dot(implementation="triton")``: a Pallas-Triton grouped GEMM (any NVIDIA
              GPU from sm80), forward and both backward products (dlhs, drhs) as the same kind of kernel.
  mosaic_gpu  tokamax's Pallas Mosaic-GPU grouped GEMM (Hopper and later).
  xla         tokamax's reference implementation (``lax.ragged_dot``); CPU tests run our code through
              tokamax's entry point with it.

The kernel is chosen by the platform of the mesh the program is traced for, never by
``jax.default_backend()``; tokamax is loaded and told about deviceless compiles by
``mixtral_jax.tokamax_lib``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax import tokamax_lib

KERNELS = ("lax", "triton", "mosaic_gpu", "xla")
GPU_KERNELS = ("triton", "mosaic_gpu")


def kernel_problem(kernel: str, platform: str) -> str | None:
  """Why ``kernel`` cannot (or must not) run on ``platform``, or None."""
  if kernel not in KERNELS:
    return f"unknown grouped-matmul kernel {kernel!r} (one of {', '.join(KERNELS)})"
  if kernel in GPU_KERNELS and platform != "gpu":
    return f"{kernel} is a GPU kernel and the devices are {platform}"
  if kernel == "lax" and platform == "gpu":
    return ("XLA:GPU expands lax.ragged_dot into a dense dot over every expert (E times the FLOPs), "
            "so dropless experts on GPU need a grouped GEMM")
  return None


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, sizes_G: jax.Array, kernel: str) -> jax.Array:
  """``[M, K] x [G, K, N] -> [M, N]`` per contiguous group, in x's dtype (see the module docstring).

  16-bit inputs take the default precision explicitly: under ``jax_default_matmul_precision="highest"``
  the TPU's Mosaic grouped matmul is asked for fp32 contraction of bf16 operands and fails to compile
  ("Bad lhs type", libtpu 0.0.42); float32 inputs keep the global setting."""
  precision = None if x_MK.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  sizes_G = sizes_G.astype(jnp.int32)
  if kernel == "lax":
    return jax.lax.ragged_dot(x_MK, w_GKN, sizes_G, precision=precision)
  return _tokamax_matmul(x_MK, w_GKN.astype(x_MK.dtype), sizes_G, kernel, precision)


def _tokamax_general(lhs, rhs, sizes_G, dims, kernel, precision, out_dtype):
  """One tokamax grouped GEMM with ``lax.ragged_dot_general``'s dimension numbers
  ``(contracting, lhs ragged dims, rhs group dims)``."""
  contract, lhs_ragged, rhs_group = dims
  numbers = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(contract, ((), ())),
                                              lhs_ragged_dimensions=lhs_ragged, rhs_group_dimensions=rhs_group)

  def call(lhs, rhs, sizes_G):
    return tokamax_lib.load().ragged_dot_general(lhs, rhs, sizes_G, numbers, precision=precision,
                                                 preferred_element_type=out_dtype, implementation=kernel)
  with tokamax_lib.cross_compiling(kernel in GPU_KERNELS):
    return tokamax_lib.per_device(call, lhs, rhs, sizes_G).astype(out_dtype)


# [M, K] x [G, K, N] -> [M, N] and its two backward products, as tokamax's own VJP computes them:
FORWARD = (((1,), (1,)), (0,), (0,))
DLHS = (((1,), (2,)), (0,), (0,))  # dy [M, N] x w [G, K, N] -> dx [M, K], rows in the same groups
DRHS = (((0,), (0,)), (0,), ())  # x [M, K] x dy [M, N] -> dw [G, K, N], each group's rows summed


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tokamax_matmul(x_MK, w_GKN, sizes_G, kernel, precision):
  """tokamax's kernel, with the backward products (dlhs, drhs) as two more of its grouped GEMMs, each
  traced under ``tokamax_lib.cross_compiling`` and ``tokamax_lib.per_device``."""
  return _tokamax_general(x_MK, w_GKN, sizes_G, FORWARD, kernel, precision, x_MK.dtype)


def _tokamax_fwd(x_MK, w_GKN, sizes_G, kernel, precision):
  return _tokamax_matmul(x_MK, w_GKN, sizes_G, kernel, precision), (x_MK, w_GKN, sizes_G)


def _tokamax_bwd(kernel, precision, res, dy_MN):
  x_MK, w_GKN, sizes_G = res
  dy_MN = dy_MN.astype(x_MK.dtype)
  dx_MK = _tokamax_general(dy_MN, w_GKN, sizes_G, DLHS, kernel, precision, x_MK.dtype)
  dw_GKN = _tokamax_general(x_MK, dy_MN, sizes_G, DRHS, kernel, precision, w_GKN.dtype)
  sizes_ct = jnp.zeros(sizes_G.shape, jax.dtypes.float0)  # integer input: a float0 cotangent
  return tokamax_lib.cotangent_for(dx_MK, x_MK), tokamax_lib.cotangent_for(dw_GKN, w_GKN), sizes_ct


_tokamax_matmul.defvjp(_tokamax_fwd, _tokamax_bwd)
