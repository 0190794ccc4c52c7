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
* ``triton`` (GPU default), ``mosaic_gpu``: tokamax's grouped GEMM kernels on contiguous groups from row
  0 (see ``mixtral_jax.grouped_matmul``); forward, both backward products and the adapters each one
  grouped GEMM, with no expansion over experts.
* ``ragged`` (TPU default): ``jax.lax.ragged_dot`` on the same groups, XLA:TPU's Mosaic kernel there. On
  GPU XLA expands it over every expert (E times the FLOPs), so it is refused there.
* ``dense``: every expert on every row of its fixed-capacity bucket, one batched einsum
  (``[E, C, D] x [E, D, F]``); the natural choice for capacity-bucketed (dropping) dispatch.

Each takes optional per-expert LoRA adapters (``lora``, a :class:`~mixtral_jax.expert_adapters.ExpertLoRA`)
and applies them to its own rows: ``x W_e + (drop(x) A_e) B_e`` for each adapted weight, with ``rows``
giving each row's (token, slot) pair id for the dropout mask (see ``mixtral_jax.expert_adapters``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from mixtral_jax import grouped_matmul as gmm
from mixtral_jax.expert_adapters import ExpertLoRA, drop, project, project_buckets, project_ragged
from mixtral_jax.sharding.mesh import current_platform

f32 = jnp.float32

# Names (``checkpoint_name``) of what the backward of the experts needs, so that a remat policy
# (``mixtral_jax.model.REMAT_POLICIES``) can keep it instead of exchanging the tokens again and
# recomputing the experts, which are most of a Mixtral layer's FLOPs:
#   EXPERT_IN    the FFN's input rows as the dispatch delivered them (for the w1/w3 gradients);
#   EXPERT_GATE, EXPERT_UP  the gate and up products (the backward of silu(a1) * a3, the w2 gradient);
#   EXPERT_OUT   each token's k expert outputs, back from the experts, as the combine reads them (the
#                router's gradient through the combine weights), named where the combine is
#                (``moe.combine``, ``sharding.expert_parallel``).
# The blocked kernel keeps its own residuals (custom VJP).
EXPERT_IN, EXPERT_GATE, EXPERT_UP, EXPERT_OUT = "expert_in", "expert_gate", "expert_up", "expert_out"


GROUPED_GEMM = {"ragged": "lax", "triton": "triton", "mosaic_gpu": "mosaic_gpu"}  # moe_impl -> grouped matmul


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """``auto`` -> ``triton`` on GPU, ``ragged`` on TPU, ``blocked`` on CPU. The platform is that of the
  devices the program is being traced for (``sharding.mesh.current_platform``: the mesh's devices), so a
  GPU or TPU program compiled ahead of time on a CPU host gets that platform's choice. A GPU kernel
  named for other devices is an error naming the fix."""
  platform = platform or current_platform()
  if impl == "auto":
    return {"gpu": "triton", "tpu": "ragged"}.get(platform, "blocked")
  if impl in gmm.GPU_KERNELS and platform != "gpu":
    raise ValueError(f"moe_impl={impl!r} is a GPU kernel and the devices are {platform}; "
                     "use moe_impl='auto' (or 'blocked' / 'ragged')")
  return impl


def grouped_kernel(impl: str, platform: str | None = None) -> str:
  """The grouped-matmul kernel (``grouped_matmul.KERNELS``) of a grouped ``moe_impl`` on this platform;
  one that would expand over experts here (``ragged`` on GPU) is an error naming the fix."""
  platform = platform or current_platform()
  kernel = GROUPED_GEMM[resolve_impl(impl, platform)]
  problem = gmm.kernel_problem(kernel, platform)
  if problem:
    raise ValueError(f"moe_impl={impl!r} cannot run dropless experts here: {problem}; "
                     "use moe_impl='auto' (triton on GPU)")
  return kernel


# ------------------------------------------------------------------------------------ dense


def dense_expert_ffn(x_ECD: jax.Array, w1_EDF, w3_EDF, w2_EFD, lora: ExpertLoRA | None = None,
                     rows_EC=None) -> jax.Array:
  """Every expert on its own fixed-size bucket: three batched matmuls (plus the adapters' thin ones)."""
  x_ECD = checkpoint_name(x_ECD, EXPERT_IN)
  a1_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w1_EDF)  # gate projection
  a1_ECF = checkpoint_name(project_buckets(lora, "w1", x_ECD, a1_ECF, rows_EC), EXPERT_GATE)
  a3_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, w3_EDF)  # up projection
  a3_ECF = checkpoint_name(project_buckets(lora, "w3", x_ECD, a3_ECF, rows_EC), EXPERT_UP)
  h_ECF = jax.nn.silu(a1_ECF) * a3_ECF
  y_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, w2_EFD)  # down projection
  return project_buckets(lora, "w2", h_ECF, y_ECD, rows_EC)


# ------------------------------------------------------------------------------------ ragged


def ragged_expert_ffn(x_MD, sizes_E, w1_EDF, w3_EDF, w2_EFD, lora: ExpertLoRA | None = None,
                      rows_M=None, kernel: str = "lax") -> jax.Array:
  """Contiguous groups from row 0 (sizes_E sum to at most M); rows past the groups give zero.

  Every product, the adapters' thin ones included, is one grouped matmul by ``kernel``
  (``mixtral_jax.grouped_matmul``), so no step computes an expert on another expert's rows."""
  dot = lambda a, w, sizes: gmm.grouped_matmul(a, w, sizes, kernel)  # noqa: E731
  x_MD = checkpoint_name(x_MD, EXPERT_IN)
  a1_MF = project_ragged(lora, "w1", x_MD, dot(x_MD, w1_EDF, sizes_E), sizes_E, dot, rows_M)
  a3_MF = project_ragged(lora, "w3", x_MD, dot(x_MD, w3_EDF, sizes_E), sizes_E, dot, rows_M)
  a1_MF, a3_MF = checkpoint_name(a1_MF, EXPERT_GATE), checkpoint_name(a3_MF, EXPERT_UP)
  h_MF = jax.nn.silu(a1_MF) * a3_MF
  y_MD = project_ragged(lora, "w2", h_MF, dot(h_MF, w2_EFD, sizes_E), sizes_E, dot, rows_M)
  covered_M = jnp.arange(x_MD.shape[0]) < jnp.sum(sizes_E)
  return jnp.where(covered_M[:, None], y_MD, 0).astype(x_MD.dtype)


# ------------------------------------------------------------------------------------ blocked


def _block_rows(start, j, block):
  return start + j * block


def _valid(size, j, block):
  return (j * block + jnp.arange(block)) < size  # [block]


def _pad_rows(a, block):
  return jnp.pad(a, ((0, block),) + ((0, 0),) * (a.ndim - 1))  # so a block at any row < M stays in bounds


def _zeros(shape, dtype, *like):
  """Zeros that vary over the same manual mesh axes as ``like`` when traced inside ``shard_map``
  (loop carries must keep their type there); plain zeros elsewhere."""
  axes = frozenset().union(*(jax.typeof(a).mat.varying for a in like))
  z = jnp.zeros(shape, dtype)
  return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def _like(*trees):
  return tuple(a for t in trees for a in jax.tree.leaves(t) if jnp.issubdtype(a.dtype, jnp.floating))


def _rows_of(rows_M, M):
  return jnp.full((M,), -1, jnp.int32) if rows_M is None else rows_M.astype(jnp.int32)


def _blocked_fwd_impl(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, lora, rows_M, block, save_residuals):
  M, D = x_MD.shape
  E, _, F = w1_EDF.shape
  G = starts_G.shape[0]
  per = G // E
  xp = _pad_rows(x_MD, block)
  rp = _pad_rows(_rows_of(rows_M, M), block)
  like = _like(x_MD, w1_EDF, w3_EDF, w2_EFD, lora)
  y = _zeros((M + block, D), x_MD.dtype, *like)
  a1_all = _zeros((M + block, F), x_MD.dtype, *like) if save_residuals else None
  a3_all = _zeros((M + block, F), x_MD.dtype, *like) if save_residuals else None

  for e in range(E):  # static: each expert's weights are a static slice, never copied per block
    w1, w3, w2 = w1_EDF[e], w3_EDF[e], w2_EFD[e]
    lo = None if lora is None else lora.expert(e)

    def group_body(g, carry, w1=w1, w3=w3, w2=w2, lo=lo, e=e):
      start, size = starts_G[e * per + g], sizes_G[e * per + g]
      nblocks = (size + block - 1) // block

      def body(state):
        j, y, a1_all, a3_all = state
        r0 = _block_rows(start, j, block)
        xb = jax.lax.dynamic_slice_in_dim(xp, r0, block)
        rb = jax.lax.dynamic_slice_in_dim(rp, r0, block)
        a1 = project(lo, "w1", xb, xb @ w1, rb)
        a3 = project(lo, "w3", xb, xb @ w3, rb)
        h = jax.nn.silu(a1) * a3
        yb = project(lo, "w2", h, h @ w2, rb)
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


def _lowrank_bwd(lo, target, x, dz, rows):
  """For z = x W + (drop(x) A) B: (dx contribution through the adapter, dA, dB) of one block, given dz.
  ``dx`` through W is the caller's (the base is frozen or not independently of the adapter)."""
  A, B = lo.get(target)
  dt = x.dtype
  xd = drop(lo, target, x, rows)
  u = xd @ A.astype(dt)  # [b, r]
  du = dz @ B.astype(dt).T  # [b, r]
  dB = jnp.einsum("br,bo->ro", u, dz, preferred_element_type=f32)
  dA = jnp.einsum("bi,br->ir", xd, du, preferred_element_type=f32)
  dx = drop(lo, target, du @ A.astype(dt).T, rows)  # dropout's derivative: the same mask and scale
  return dx, dA, dB


def _blocked_bwd_impl(block, res, dy_MD):
  x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, lora, rows_M, a1_all, a3_all, need_w = res
  M, D = x_MD.shape
  E, _, F = w1_EDF.shape
  G = starts_G.shape[0]
  per = G // E
  xp = _pad_rows(x_MD, block)
  dyp = _pad_rows(dy_MD, block)
  rp = _pad_rows(_rows_of(rows_M, M), block)
  like = _like(x_MD, dy_MD, w1_EDF, w3_EDF, w2_EFD, lora)
  dx = _zeros((M + block, D), x_MD.dtype, *like)
  targets = () if lora is None else tuple(t for t in ("w1", "w3", "w2") if lora.get(t) is not None)
  dws, dlora = [], []

  for e in range(E):
    w1, w3, w2 = w1_EDF[e], w3_EDF[e], w2_EFD[e]
    lo = None if lora is None else lora.expert(e)

    def group_body(g, carry, w1=w1, w3=w3, w2=w2, lo=lo, e=e):
      start, size = starts_G[e * per + g], sizes_G[e * per + g]
      nblocks = (size + block - 1) // block

      def body(state):
        j, dx, dw, dab = state
        r0 = _block_rows(start, j, block)
        keep = _valid(size, j, block)[:, None]
        xb = jnp.where(keep, jax.lax.dynamic_slice_in_dim(xp, r0, block), 0)
        dyb = jnp.where(keep, jax.lax.dynamic_slice_in_dim(dyp, r0, block), 0)
        rb = jax.lax.dynamic_slice_in_dim(rp, r0, block)
        a1 = jax.lax.dynamic_slice_in_dim(a1_all, r0, block)
        a3 = jax.lax.dynamic_slice_in_dim(a3_all, r0, block)
        dxb, dw, dab = _block_bwd((w1, w3, w2), lo, xb, dyb, rb, a1, a3, dw, dab)
        dx = jax.lax.dynamic_update_slice_in_dim(
            dx, jnp.where(keep, dxb, jax.lax.dynamic_slice_in_dim(dx, r0, block)), r0, 0)
        return j + 1, dx, dw, dab

      _, *rest = jax.lax.while_loop(lambda s: s[0] < nblocks, body, (0, *carry))
      return tuple(rest)

    dw0 = None if need_w is None else (
        _zeros((D, F), f32, *like), _zeros((D, F), f32, *like), _zeros((F, D), f32, *like))
    dab0 = {t: tuple(_zeros(a.shape, f32, *like) for a in lo.get(t)) for t in targets}
    dx, dw, dab = jax.lax.fori_loop(0, per, group_body, (dx, dw0, dab0))
    dws.append(dw)
    dlora.append(dab)

  return dx[:M], *_stack_grads(dws, dlora, (w1_EDF, w3_EDF, w2_EFD), lora, targets, need_w)


def _block_bwd(ws, lo, xb, dyb, rb, a1, a3, dw, dab):
  """One block's backward through y = (silu(a1) * a3) W2 (+ adapters), with a1 = x W1 and a3 = x W3
  saved by the forward: (dx of the block, the running base-weight gradients ``dw`` plus this block's
  (None when not differentiated), the running adapter gradients ``dab`` plus this block's)."""
  w1, w3, w2 = ws
  sig = jax.nn.sigmoid(a1)
  silu = a1 * sig
  h = silu * a3
  dab = dict(dab)
  dh = dyb @ w2.T
  if "w2" in dab:
    dh_a, dA, dB = _lowrank_bwd(lo, "w2", h, dyb, rb)
    dh, dab["w2"] = dh + dh_a, (dab["w2"][0] + dA, dab["w2"][1] + dB)
  da3 = dh * silu
  da1 = dh * a3 * (sig * (1 + a1 * (1 - sig)))  # d silu(a) / da
  dxb = da1 @ w1.T + da3 @ w3.T
  for t, da in (("w1", da1), ("w3", da3)):
    if t in dab:
      dx_a, dA, dB = _lowrank_bwd(lo, t, xb, da, rb)
      dxb, dab[t] = dxb + dx_a, (dab[t][0] + dA, dab[t][1] + dB)
  if dw is not None:  # the base weights' gradients, only when they are differentiated
    dw = (dw[0] + jnp.einsum("bd,bf->df", xb, da1, preferred_element_type=f32),
          dw[1] + jnp.einsum("bd,bf->df", xb, da3, preferred_element_type=f32),
          dw[2] + jnp.einsum("bf,bd->fd", h, dyb, preferred_element_type=f32))
  return dxb, dw, dab


def _stack_grads(dws, dlora, weights, lora, targets, need_w):
  """The per-expert gradients stacked back into the weights' [E, ...] layout and dtypes: (dW1, dW3,
  dW2) (Nones when not differentiated) and the adapters' gradients as an ExpertLoRA (or None)."""
  stack = lambda ws, like: jnp.stack(ws).astype(like.dtype)  # noqa: E731
  dW = (None, None, None) if need_w is None else tuple(
      stack([d[i] for d in dws], w) for i, w in enumerate(weights))
  dL = None
  if lora is not None:
    dL = dataclasses.replace(lora, key=None, **{
        t: tuple(stack([d[t][i] for d in dlora], lora.get(t)[i]) for i in range(2)) for t in targets})
  return dW, dL


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def blocked_expert_ffn(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block: int, lora=None, rows_M=None):
  """Grouped FFN over row groups, computing only ``ceil(size / block)`` blocks per group."""
  y, _ = _blocked_fwd_impl(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, lora, rows_M, block, False)
  return y


def _blocked_fwd(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block, lora, rows_M):
  """``symbolic_zeros``: the args arrive as (value, perturbed) records. The base weights' gradients are
  computed only when some base weight is differentiated (not for LoRA's frozen base)."""
  need_w = any(p.perturbed for p in (w1_EDF, w3_EDF, w2_EFD))
  x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, lora, rows_M = jax.tree.map(
      lambda p: p.value, (x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, lora, rows_M))
  y, (a1, a3) = _blocked_fwd_impl(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, lora, rows_M, block, True)
  # ``need_w`` rides in the residuals' tree structure (() or None), which is static.
  return y, (x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, lora, rows_M, a1, a3, () if need_w else None)


def _match_varying(ct, primal):
  """Inside ``shard_map``, a cotangent that varies over more mesh axes than its primal is summed over the
  extra ones: the transpose of the implicit broadcast that made the primal's uses vary."""
  extra = jax.typeof(ct).mat.varying - jax.typeof(primal).mat.varying
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _blocked_bwd(block, res, dy):
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    dy = jnp.zeros(dy.shape, dy.dtype)
  dx, dW, dL = _blocked_bwd_impl(block, res, dy)
  x_MD, w1_EDF, w3_EDF, w2_EFD, lora = res[0], res[3], res[4], res[5], res[6]
  dx = _match_varying(dx, x_MD)
  dW = tuple(None if g is None else _match_varying(g, w) for g, w in zip(dW, (w1_EDF, w3_EDF, w2_EFD)))
  if dL is not None:
    dL = jax.tree.map(_match_varying, dL, dataclasses.replace(lora, key=None))
    if lora.key is not None:  # the key is an integer input: a float0 cotangent
      dL = dataclasses.replace(dL, key=jnp.zeros(lora.key.shape, jax.dtypes.float0))
  return (dx, None, None, *dW, dL, None)  # block is nondiff: no entry


blocked_expert_ffn.defvjp(_blocked_fwd, _blocked_bwd, symbolic_zeros=True)


def grouped_expert_ffn(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, *, impl: str = "auto",
                       block: int = 128, contiguous: bool = False, lora: ExpertLoRA | None = None,
                       rows_M=None) -> jax.Array:
  """Dispatches to the implementation for this platform. ``contiguous`` promises G = E groups packed
  from row 0 in expert order (what the grouped GEMMs need); otherwise a grouped ``impl`` falls back to
  ``blocked``. ``lora``/``rows_M``: per-expert adapters and each row's pair id (for their dropout)."""
  impl = resolve_impl(impl)
  if impl in GROUPED_GEMM and contiguous:
    return ragged_expert_ffn(x_MD, sizes_G, w1_EDF, w3_EDF, w2_EFD, lora, rows_M, kernel=grouped_kernel(impl))
  if impl == "dense":
    raise ValueError("the dense implementation works on [E, C, D] buckets; call dense_expert_ffn")
  block = max(1, min(block, x_MD.shape[0]))
  if lora is not None and not lora.needs_rows:
    rows_M = None
  # Under jit: a custom VJP with symbolic zeros cannot be traced by an eager (un-jitted) shard_map.
  return _blocked_jit(x_MD, starts_G, sizes_G, w1_EDF, w3_EDF, w2_EFD, block, lora, rows_M)


_blocked_jit = jax.jit(blocked_expert_ffn, static_argnums=6)
