"""Grouped expert FFN: y = w2_e(silu(x w1_e) * (x w3_e)) for rows grouped by expert.

Rows are laid out in G groups, G a multiple of E; group g belongs to expert ``g // (G // E)`` and
covers rows ``[starts[g], starts[g] + sizes[g])`` of ``x_MD``. Rows in no group come out as zero.
Two layouts use this:

* the single-device dropless path: pairs sorted by expert, G = E contiguous groups;
* the expert-parallel path: received buckets ``[E_local, n_src, C]`` with per-bucket counts.

Implementations (``MixtralConfig.moe_impl``):

* ``blocked`` (CPU default): per expert, a ``while_loop`` over row blocks of ``moe_block`` rows that
  stops at the group's true size, so work follows the actual routing, not the worst case. XLA:CPU
  runs ``ragged_dot`` about 10x slower than batched matmuls, which is why this exists. It has a
  hand-written VJP (``while_loop`` has no reverse-mode derivative), saving the two pre-activations.
* ``ragged`` (GPU/TPU default): ``jax.lax.ragged_dot`` on contiguous groups starting at row 0.
* ``dense``: every expert on every row of its fixed-capacity bucket, one batched einsum
  (``[E, C, D] x [E, D, F]``); the natural choice for capacity-bucketed (dropping) dispatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax.sharding.mesh import current_platform

f32 = jnp.float32


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """``auto`` -> ``ragged`` on GPU/TPU, ``blocked`` on CPU. The platform is that of the devices the
  program is being traced for (``sharding.mesh.current_platform``: the mesh's devices), so a TPU program
  compiled ahead of time on a CPU host gets the TPU choice."""
  if impl != "auto":
    return impl
  return "ragged" if (platform or current_platform()) in ("gpu", "tpu") else "blocked"


# ------------------------------------------------------------------------------------ dense


def dense_expert_ffn(x_ECD: jax.Array, w1_EDF, w3_EDF, w2_EFD) -> jax.Array:
  """Every expert on its own fixed-size bucket: three batched matmuls."""
  a1_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w1_EDF)  # gate projection
  a3_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w3_EDF)  # up projection
  h_ECF = jax.nn.silu(a1_ECF) * a3_ECF
  return jnp.einsum("ecf,efd->ecd", h_ECF, w2_EFD)  # down projection


# ------------------------------------------------------------------------------------ ragged


def ragged_expert_ffn(x_MD, sizes_E, w1_EDF, w3_EDF, w2_EFD) -> jax.Array:
  """Contiguous groups from row 0 (sizes_E sum to at most M); rows past the groups give zero.

  16-bit inputs take the default precision explicitly: under ``jax_default_matmul_precision="highest"``
  the TPU's Mosaic grouped-matmul kernel is asked for fp32 contraction of bf16 operands and fails to
  compile ("Bad lhs type", libtpu 0.0.42); for float32 inputs the global setting still applies."""
  dot = functools.partial(jax.lax.ragged_dot, precision=None if x_MD.dtype == f32 else jax.lax.Precision.DEFAULT)
  a1_MF = dot(x_MD, w1_EDF, sizes_E)
  a3_MF = dot(x_MD, w3_EDF, sizes_E)
  h_MF = jax.nn.silu(a1_MF) * a3_MF
  y_MD = dot(h_MF, w2_EFD, sizes_E)
  covered_M = jnp.arange(x_MD.shape[0]) < jnp.sum(sizes_E)
  return jnp.where(covered_M[:, None], y_MD, 0).astype(x_MD.dtype)


# ------------------------------------------------------------------------------------ blocked


def _block_rows(start, j, block):
  return start + j * block


def _valid(size, j, block):
  return (j * block + jnp.arange(block)) < size  # [block]


def _pad_rows(a, block):
  return jnp.pad(a, ((0, block), (0, 0)))  # so a block starting at any row < M stays in bounds


def _zeros(shape, dtype, *like):
  """Zeros that vary over the same manual mesh axes as ``like`` when traced inside ``shard_map``
  (loop carries must keep their type there); plain zeros elsewhere."""
  axes = frozenset().union(*(jax.typeof(a).mat.varying for a in like))
  z = jnp.zeros(shape, dtype)
  return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def _blocked_fwd_impl(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block, save_residuals):
  M, D = x_MD.shape
  E, _, F = w1_EDF.shape
  G = starts_G.shape[0]
  per = G // E
  xp = _pad_rows(x_MD, block)
  y = _zeros((M + block, D), x_MD.dtype, x_MD, w1_EDF, w3_EDF, w2_EFD)
  a1_all = _zeros((M + block, F), x_MD.dtype, x_MD, w1_EDF, w3_EDF) if save_residuals else None
  a3_all = _zeros((M + block, F), x_MD.dtype, x_MD, w1_EDF, w3_EDF) if save_residuals else None

  for e in range(E):  # static: each expert's weights are a static slice, never copied per block
    w1, w3, w2 = w1_EDF[e], w3_EDF[e], w2_EFD[e]

    def group_body(g, carry, w1=w1, w3=w3, w2=w2, e=e):
      start, size = starts_G[e * per + g], sizes_G[e * per + g]
      nblocks = (size + block - 1) // block

      def body(state):
        j, y, a1_all, a3_all = state
        r0 = _block_rows(start, j, block)
        xb = jax.lax.dynamic_slice_in_dim(xp, r0, block)
        a1 = xb @ w1
        a3 = xb @ w3
        yb = (jax.nn.silu(a1) * a3) @ w2
        keep = _valid(size, j, block)[:, None]
        y = jax.lax.dynamic_update_slice_in_dim(
            y, jnp.where(keep, yb, jax.lax.dynamic_slice_in_dim(y, r0, block)), r0, 0)
        if save_residuals:
          a1_all = jax.lax.dynamic_update_slice_in_dim(a1_all, a1, r0, 0)
          a3_all = jax.lax.dynamic_update_slice_in_dim(a3_all, a3, r0, 0)
        return j + 1, y, a1_all, a3_all

      _, *rest = jax.lax.while_loop(lambda s: s[0] < nblocks, body, (0, *carry))
      return tuple(rest)

    y, a1_all, a3_all = jax.lax.fori_loop(0, per, group_body, (y, a1_all, a3_all))
  return y[:M], (a1_all, a3_all)


def _blocked_bwd_impl(block, res, dy_MD):
  x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, a1_all, a3_all = res
  M, D = x_MD.shape
  E, _, F = w1_EDF.shape
  G = starts_G.shape[0]
  per = G // E
  xp = _pad_rows(x_MD, block)
  dyp = _pad_rows(dy_MD, block)
  like = (x_MD, dy_MD, w1_EDF, w3_EDF, w2_EFD)
  dx = _zeros((M + block, D), x_MD.dtype, *like)
  dw1s, dw3s, dw2s = [], [], []

  for e in range(E):
    w1, w3, w2 = w1_EDF[e], w3_EDF[e], w2_EFD[e]

    def group_body(g, carry, w1=w1, w3=w3, w2=w2, e=e):
      start, size = starts_G[e * per + g], sizes_G[e * per + g]
      nblocks = (size + block - 1) // block

      def body(state):
        j, dx, dw1, dw3, dw2 = state
        r0 = _block_rows(start, j, block)
        keep = _valid(size, j, block)[:, None]
        xb = jnp.where(keep, jax.lax.dynamic_slice_in_dim(xp, r0, block), 0)
        dyb = jnp.where(keep, jax.lax.dynamic_slice_in_dim(dyp, r0, block), 0)
        a1 = jax.lax.dynamic_slice_in_dim(a1_all, r0, block)
        a3 = jax.lax.dynamic_slice_in_dim(a3_all, r0, block)
        sig = jax.nn.sigmoid(a1)
        silu = a1 * sig
        h = silu * a3
        dw2 = dw2 + jnp.einsum("bf,bd->fd", h, dyb, preferred_element_type=f32)
        dh = dyb @ w2.T
        da3 = dh * silu
        da1 = dh * a3 * (sig * (1 + a1 * (1 - sig)))  # d silu(a) / da
        dw1 = dw1 + jnp.einsum("bd,bf->df", xb, da1, preferred_element_type=f32)
        dw3 = dw3 + jnp.einsum("bd,bf->df", xb, da3, preferred_element_type=f32)
        dxb = da1 @ w1.T + da3 @ w3.T
        dx = jax.lax.dynamic_update_slice_in_dim(
            dx, jnp.where(keep, dxb, jax.lax.dynamic_slice_in_dim(dx, r0, block)), r0, 0)
        return j + 1, dx, dw1, dw3, dw2

      _, *rest = jax.lax.while_loop(lambda s: s[0] < nblocks, body, (0, *carry))
      return tuple(rest)

    zeros = (_zeros((D, F), f32, *like), _zeros((D, F), f32, *like), _zeros((F, D), f32, *like))
    dx, dw1, dw3, dw2 = jax.lax.fori_loop(0, per, group_body, (dx, *zeros))
    dw1s.append(dw1)
    dw3s.append(dw3)
    dw2s.append(dw2)

  cast = lambda ws, like: jnp.stack(ws).astype(like.dtype)
  return (dx[:M], None, None, cast(dw1s, w1_EDF), cast(dw3s, w3_EDF), cast(dw2s, w2_EFD))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def blocked_expert_ffn(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block: int):
  """Grouped FFN over row groups, computing only ``ceil(size / block)`` blocks per group."""
  y, _ = _blocked_fwd_impl(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block, False)
  return y


def _blocked_fwd(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block):
  y, (a1, a3) = _blocked_fwd_impl(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block, True)
  return y, (x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, a1, a3)


def _match_varying(ct, primal):
  """Inside ``shard_map``, a cotangent that varies over more mesh axes than its primal is summed over the
  extra ones: the transpose of the implicit broadcast that made the primal's uses vary."""
  extra = jax.typeof(ct).mat.varying - jax.typeof(primal).mat.varying
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _blocked_bwd(block, res, dy):
  grads = _blocked_bwd_impl(block, res, dy)
  # Integer inputs take float0 cotangents.
  starts, sizes = res[1], res[2]
  zero_int = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
  dx, dw1, dw3, dw2 = (_match_varying(g, p) for g, p in zip(
      (grads[0], *grads[3:]), (res[0], *res[3:6])))
  return (dx, zero_int(starts), zero_int(sizes), dw1, dw3, dw2)


blocked_expert_ffn.defvjp(_blocked_fwd, _blocked_bwd)


def grouped_expert_ffn(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, *, impl: str = "auto",
                       block: int = 128, contiguous: bool = False) -> jax.Array:
  """Dispatches to the implementation for this backend. ``contiguous`` promises G = E groups packed
  from row 0 in expert order (what ``ragged_dot`` needs); otherwise ``ragged`` falls back to
  ``blocked``."""
  impl = resolve_impl(impl)
  if impl == "ragged" and contiguous:
    return ragged_expert_ffn(x_MD, sizes_G, w1_EDF, w3_EDF, w2_EFD)
  if impl == "dense":
    raise ValueError("the dense implementation works on [E, C, D] buckets; call dense_expert_ffn")
  block = max(1, min(block, x_MD.shape[0]))
  return blocked_expert_ffn(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block)
