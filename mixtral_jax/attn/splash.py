"""TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) for self-attention.

The kernel masks by *index*: causal (``CausalMask``), the window W as ``LocalMask((W-1, 0))`` (keys
i-W+1..i), packing by ``SegmentIds``. That equals our position rule (:mod:`mixtral_jax.attn.mask`)
exactly when keys are the queries' own tokens (no KV cache) and positions count up by one along each
segment: training batches (positions restart per packed document), the full forward with default
positions, left-padded batches with cumulative positions. Padding (position -1) becomes a segment of
its own, so real tokens never see it; a pad query then sees other pads (finite, never used). So
:func:`splash_problem` refuses a cache (``index_aligned=False``) and non-TPU platforms.

GQA is native (the MHA kernel takes K <= N key heads). Mosaic kernels refuse automatic partitioning,
so under a mesh the kernel runs in ``shard_map``: batch over the ``batch`` mesh axes, heads over the
``act_heads`` ones (when they divide K), each device ``vmap``-ing the kernel over its rows. T is
padded to a multiple of 128 (a pad segment at the end, which no real query sees).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.sharding.rules import logical_to_spec

LANES = 128  # the kernel's block sizes are multiples of this
DEFAULT_BLOCK = 512
_PAD_SEGMENT = -1


def splash_problem(*, platform: str, T: int, S: int, head_dim: int, index_aligned: bool,
                   interpret: bool = False) -> str | None:
  """Why splash cannot run this call, or None."""
  if platform != "tpu" and not interpret:
    return f"it is a TPU kernel and the devices are {platform}"
  if not index_aligned or T != S:
    return "it masks by index, so it needs self-attention without a KV cache (prefill and decode read one)"
  del head_dim  # any: compiled for v5p ahead of time with H = 20, 32 and 128 (docs/benchmarks.md)
  return None


def _kernel(num_heads: int, T: int, window: int | None, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

  mask = sa.CausalMask(shape=(T, T))
  if window is not None:
    mask = mask & sa.LocalMask(shape=(T, T), window_size=(window - 1, 0), offset=0)
  b = min(block, T)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sa.make_splash_mha(sa.MultiHeadMask([mask] * num_heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _default_precision(f):
  """``f(q, k, v, seg)`` traced forward and backward (for q, k, v) under the default matmul precision.

  Why: the kernel's matmuls take their precision from ``jax_default_matmul_precision`` when traced,
  and under "highest" Mosaic is asked for fp32 contract precision on bf16 operands and refuses to
  compile. The kernel is written for the default (bf16 products, f32 accumulation). Its backward is
  traced when the gradient is taken, outside this call, hence the custom VJP around its own VJP."""

  @jax.custom_vjp
  def g(q, k, v, seg):
    with jax.default_matmul_precision("default"):
      return f(q, k, v, seg)

  def fwd(q, k, v, seg):
    with jax.default_matmul_precision("default"):
      return jax.vjp(lambda q, k, v: f(q, k, v, seg), q, k, v)

  def bwd(vjp, ct):
    with jax.default_matmul_precision("default"):
      return (*vjp(ct), None)  # no cotangent for the integer segment ids

  g.defvjp(fwd, bwd)
  return g


def splash_attention(q_BTNH, k_BTKH, v_BTKH, pos_BT, seg_BT=None, *, sliding_window=None, block: int = DEFAULT_BLOCK,
                     interpret: bool = False) -> jax.Array:
  """Self-attention by the splash kernel. ``pos_BT`` is -1 at padding (only its sign is read: the
  kernel masks by index, see the module docstring); ``seg_BT`` the packing segments or None."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  q_BTNH = q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype)  # the kernel does not scale the logits
  seg = jnp.zeros((B, T), jnp.int32) if seg_BT is None else seg_BT.astype(jnp.int32)
  seg = jnp.where(pos_BT >= 0, seg, _PAD_SEGMENT)
  pad = -T % LANES
  if pad:
    q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BTKH, v_BTKH))
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
  Tp = T + pad

  mesh = jax.sharding.get_abstract_mesh()
  sharded = mesh is not None and not mesh.empty and mesh.size > 1
  heads = ("act_heads",)
  if sharded:
    head_axes = logical_to_spec(heads, mesh)[0]
    head_axes = (head_axes,) if isinstance(head_axes, str) else head_axes or ()
    head_shards = int(np.prod([mesh.shape[a] for a in head_axes]))
    if K % head_shards:  # heads cannot split evenly: keep them whole on every device
      heads, head_shards = (None,), 1
  else:
    head_shards = 1
  kernel = _kernel(N // head_shards, Tp, sliding_window, block, interpret)

  def local(q, k, v, seg):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds  # noqa: PLC0415

    def one(q_TNH, k_TKH, v_TKH, seg_T):
      out_NTH = _default_precision(lambda q, k, v, seg: kernel(q, k, v, segment_ids=SegmentIds(q=seg, kv=seg)))(
          q_TNH.transpose(1, 0, 2), k_TKH.transpose(1, 0, 2), v_TKH.transpose(1, 0, 2), seg_T)
      return out_NTH.transpose(1, 0, 2)

    return jax.vmap(one)(q, k, v, seg)

  if sharded:
    spec_x = logical_to_spec(("batch", None) + heads + (None,), mesh)
    spec_s = logical_to_spec(("batch", None), mesh)
    local = jax.shard_map(local, in_specs=(spec_x, spec_x, spec_x, spec_s), out_specs=spec_x, check_vma=False)
  with jax.named_scope("splash_attention"):
    out = local(q_BTNH, k_BTKH, v_BTKH, seg)
  return out[:, :T]
