"""GPU fused flash attention for packed training rows: tokamax's Pallas-Triton kernel, forward and backward.

cuDNN through ``jax.nn.dot_product_attention`` takes no segment ids (and jax's lower-level cuDNN entry
takes segments only as offsets into a ragged THD layout, not per-token ids), so packed rows use
tokamax's flash attention, whose mask is given per query as a range of visible key *indices*
(``Mask(k_start=..., is_causal=True)``): query i sees keys ``k_start[i] <= j <= i``.

Our rule (:mod:`mixtral_jax.attn.mask`) is such a range for self-attention without a cache whose
positions count up by one along each segment (``index_aligned``) and whose segments are contiguous runs
of the row (what packing makes; padding, segment 0 or position -1, is a run of its own):

  k_start[i] = max(start of i's run, i - W + 1)        (W the sliding window; no second term without)

since within a run ``q_pos - kv_pos = i - j``. The kernel never builds ``[T, S]`` logits in the
forward; its backward (tokamax 0.0.12) turns the range into a boolean ``[B, 1, T, S]`` mask (1 byte per
score, against blockwise's 4-byte float32 scores per block). A query on a padding token sees the other
pads of its run instead of nothing; its output is never used (loss weight 0, and no real query sees it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax import tokamax_lib

FLASH_KERNELS = ("triton", "xla")  # xla: tokamax's reference with the same mask object (CPU tests)


def flash_problem(*, platform: str, T: int, S: int, head_dim: int, index_aligned: bool) -> str | None:
  """Why the flash kernel cannot run this call, or None."""
  if platform != "gpu":
    return f"it is a GPU kernel and the devices are {platform}"
  if not index_aligned or T != S:
    return "it masks by index, so it needs self-attention without a KV cache (prefill and decode read one)"
  if head_dim % 16 or head_dim > 256:
    return f"head dim {head_dim} is not a multiple of 16 up to 256"
  return None


def run_starts(kv_pos_BT, seg_BT=None) -> jax.Array:
  """int32 ``[B, T]``: the index where each token's run begins. A run is a maximal stretch of one
  segment id (all one segment without ids) in which tokens are all real or all padding."""
  B, T = kv_pos_BT.shape
  key_BT = (kv_pos_BT >= 0).astype(jnp.int32)
  if seg_BT is not None:
    key_BT = key_BT + 2 * seg_BT.astype(jnp.int32)
  boundary_BT = jnp.concatenate([jnp.ones((B, 1), bool), key_BT[:, 1:] != key_BT[:, :-1]], axis=1)
  idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return jax.lax.cummax(jnp.where(boundary_BT, idx_BT, 0), axis=1)


def visible_from(kv_pos_BT, seg_BT=None, sliding_window=None) -> jax.Array:
  """int32 ``[B, T]``: ``k_start``, the first key index each query sees (module docstring)."""
  k_start_BT = run_starts(kv_pos_BT, seg_BT)
  if sliding_window is not None:
    k_start_BT = jnp.maximum(k_start_BT, jnp.arange(kv_pos_BT.shape[1], dtype=jnp.int32) - (sliding_window - 1))
  return k_start_BT


def flash_attention(q_BTNH, k_BTKH, v_BTKH, kv_pos_BT, seg_BT=None, *, sliding_window=None,
                    kernel: str = "triton") -> jax.Array:
  """Causal (windowed, packed) self-attention by tokamax's flash kernel; ``[B, T, N, H]`` in v's dtype.
  GQA is native (N query heads over K kv heads). ``kernel="xla"`` runs tokamax's reference instead."""
  k_start_B1T = visible_from(kv_pos_BT, seg_BT, sliding_window)[:, None, :]  # broadcast over heads
  with jax.named_scope("flash_attention"):
    return _flash(q_BTNH, k_BTKH, v_BTKH, k_start_B1T, kernel).astype(v_BTKH.dtype)


def _tokamax_attention(q_BTNH, k_BTKH, v_BTKH, k_start_B1T, kernel):
  # tokamax's op classes take the index-range mask; its public dot_product_attention does not.
  from tokamax._src.ops.attention import base  # noqa: PLC0415
  tokamax_lib.load()
  if kernel == "triton":
    from tokamax._src.ops.attention import pallas_triton  # noqa: PLC0415
    op = pallas_triton.PallasTritonFlashAttention()
  else:
    op = base.DotProductAttention()
  mask = base.Mask(k_start=k_start_B1T, is_causal=True)
  return op(q_BTNH, k_BTKH, v_BTKH, mask=mask, logits_dtype=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BTNH, k_BTKH, v_BTKH, k_start_B1T, kernel):
  """tokamax's kernel with its own VJP, both traced under ``tokamax_lib.cross_compiling`` (the backward
  is traced after a ``with`` around the forward has closed). The forward's pullback, whose leaves are
  the kernel's residuals (output and log-sum-exp), is the residual, so nothing is recomputed."""
  with tokamax_lib.cross_compiling(kernel == "triton"):
    return _tokamax_attention(q_BTNH, k_BTKH, v_BTKH, k_start_B1T, kernel)


def _flash_fwd(q_BTNH, k_BTKH, v_BTKH, k_start_B1T, kernel):
  with tokamax_lib.cross_compiling(kernel == "triton"):
    out, pullback = jax.vjp(lambda q, k, v: _tokamax_attention(q, k, v, k_start_B1T, kernel), q_BTNH, k_BTKH, v_BTKH)
  return out, (pullback, k_start_B1T)


def _flash_bwd(kernel, res, dout_BTNH):
  pullback, k_start_B1T = res
  with tokamax_lib.cross_compiling(kernel == "triton"):
    dq, dk, dv = pullback(dout_BTNH)
  return dq, dk, dv, jnp.zeros(k_start_B1T.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)
