"""One entry point, :func:`attend`, and the rule that picks the implementation (``attention_impl``).

  dense      whole [B, K, G, T, S] float32 logits; fastest when T * S is small (decode, short prompts)
  blockwise  pure-JAX flash attention (any backend, any mask of ours); O(T * block) memory
  splash     TPU Pallas kernel; self-attention whose positions count up by one along each segment
  cudnn      GPU cuDNN fused kernel; the same, and no packing or padding (causal + left window only)
  flash      GPU fused flash kernel (tokamax's Pallas-Triton): self-attention with packing and padding
             (segments as contiguous runs), causal + window; what packed training rows get on GPU

``auto`` picks by the platform of the mesh's devices (``sharding.mesh.current_platform``) and the
shapes: the kernel where it can express the mask (on GPU cuDNN, else flash), else dense when
T * S <= :data:`DENSE_MAX_SCORES` and S <= :data:`DENSE_MAX_KEYS`, else blockwise. A specific implementation that cannot run (wrong
platform, head dim or mask) is an error naming the setting and the alternative, never a silent
fallback.
"""

from __future__ import annotations

import logging

from mixtral_jax.attn.blockwise import DEFAULT_BLOCK, blockwise_attention
from mixtral_jax.attn.dense import dense_attention
from mixtral_jax.config import ATTENTION_IMPLS as IMPLS

# auto keeps dense attention while T * S <= DENSE_MAX_SCORES and S <= DENSE_MAX_KEYS: decode steps
# over short caches (T = 1: dense is about 2x faster than a loop over key blocks) and short
# sequences. Measured on CPU (docs/benchmarks.md): blockwise is already faster from T = S = 128-256 on,
# where dense's whole-row softmax and mask passes dominate; past 8192 keys a decode step would build
# [S]-wide float32 scores per head, which blockwise bounds by one block.
DENSE_MAX_SCORES = 1 << 16
DENSE_MAX_KEYS = 8192

log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def choose(impl: str, *, platform: str, T: int, S: int, head_dim: int, dtype, index_aligned: bool,
           packed: bool, padded: bool) -> tuple[str, str]:
  """(implementation, reason) for a call with these static properties.

  ``index_aligned``: keys are the queries' own tokens (no cache) and positions count up by one along
  each segment, so a mask by index equals ours. ``packed``: segment ids are given. ``padded``: some
  tokens may be padding (a validity mask is given).
  """
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {', '.join(IMPLS)}")
  if impl in ("dense", "blockwise"):
    return impl, "requested"
  if impl == "splash":
    from mixtral_jax.attn.splash import splash_problem  # noqa: PLC0415
    problem = splash_problem(platform=platform, T=T, S=S, head_dim=head_dim, index_aligned=index_aligned)
    if problem:
      raise ValueError(f"attention_impl='splash' cannot run here: {problem}; use attention_impl='auto' or 'blockwise'")
    return "splash", "requested"
  if impl == "cudnn":
    from mixtral_jax.attn.cudnn import cudnn_problem  # noqa: PLC0415
    problem = cudnn_problem(platform=platform, T=T, S=S, head_dim=head_dim, dtype=dtype,
                            index_aligned=index_aligned, packed=packed, padded=padded)
    if problem:
      raise ValueError(f"attention_impl='cudnn' cannot run here: {problem}; use attention_impl='auto' or 'blockwise'")
    return "cudnn", "requested"
  if impl == "flash":
    from mixtral_jax.attn.flash import flash_problem  # noqa: PLC0415
    problem = flash_problem(platform=platform, T=T, S=S, head_dim=head_dim, index_aligned=index_aligned)
    if problem:
      raise ValueError(f"attention_impl='flash' cannot run here: {problem}; use attention_impl='auto' or 'blockwise'")
    return "flash", "requested"
  # auto
  if platform == "tpu":
    from mixtral_jax.attn.splash import splash_problem  # noqa: PLC0415
    if not splash_problem(platform=platform, T=T, S=S, head_dim=head_dim, index_aligned=index_aligned):
      return "splash", "tpu self-attention"
  if platform == "gpu":
    from mixtral_jax.attn.cudnn import cudnn_problem  # noqa: PLC0415
    if not cudnn_problem(platform=platform, T=T, S=S, head_dim=head_dim, dtype=dtype, index_aligned=index_aligned,
                         packed=packed, padded=padded):
      return "cudnn", "gpu self-attention"
    from mixtral_jax.attn.flash import flash_problem  # noqa: PLC0415
    if not flash_problem(platform=platform, T=T, S=S, head_dim=head_dim, index_aligned=index_aligned):
      return "flash", "gpu self-attention, packed or padded"
  if T * S <= DENSE_MAX_SCORES and S <= DENSE_MAX_KEYS:
    return "dense", "short"
  return "blockwise", "long"


def attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, *, q_seg_BT=None, kv_seg_BS=None, sliding_window=None,
           impl: str = "auto", block: int = DEFAULT_BLOCK, index_aligned: bool = False, padded: bool = True):
  """Attention of ``q`` over ``k, v`` under the mask of :mod:`mixtral_jax.attn.mask`, by ``impl``.

  ``index_aligned`` and ``padded`` are the caller's static promises (see :func:`choose`); the kernels
  are used only where they hold. Returns ``[B, T, N, H]`` in the value dtype.
  """
  from mixtral_jax.sharding.mesh import current_platform  # noqa: PLC0415

  T, S, H = q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[3]
  name, reason = choose(impl, platform=current_platform(), T=T, S=S, head_dim=H, dtype=q_BTNH.dtype,
                        index_aligned=index_aligned, packed=q_seg_BT is not None, padded=padded)
  if (name, reason) not in _logged:
    _logged.add((name, reason))
    log.info("attention: %s (%s; attention_impl=%s, T=%d, S=%d)", name, reason, impl, T, S)
  if name == "dense":
    return dense_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS,
                           sliding_window=sliding_window)
  if name == "blockwise":
    return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, q_seg_BT, kv_seg_BS,
                               sliding_window=sliding_window, block_q=block, block_k=block)
  if name == "splash":
    from mixtral_jax.attn.splash import splash_attention  # noqa: PLC0415
    return splash_attention(q_BTNH, k_BSKH, v_BSKH, kv_pos_BS, kv_seg_BS, sliding_window=sliding_window)
  if name == "flash":
    from mixtral_jax.attn.flash import flash_attention  # noqa: PLC0415
    return flash_attention(q_BTNH, k_BSKH, v_BSKH, kv_pos_BS, kv_seg_BS, sliding_window=sliding_window)
  from mixtral_jax.attn.cudnn import cudnn_attention  # noqa: PLC0415
  return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, sliding_window=sliding_window)


def reset_log() -> None:
  """Forget which choices were logged (tests)."""
  _logged.clear()
