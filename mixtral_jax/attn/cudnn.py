"""GPU cuDNN fused attention through ``jax.nn.dot_product_attention(implementation="cudnn")``.

Its masks are by index: ``is_causal`` and a left window ``local_window_size=(W-1, 0)`` (keys
i-W+1..i, our rule's ``q - kv < W``). It has no segment ids and a padding mask only by sequence
lengths, so it expresses our rule exactly for self-attention without a KV cache, without packing and
without padding, positions counting up by one. GQA is native. cuDNN computes in bf16/fp16 only, with a
head dim that is a multiple of 8 and at most 128 (256 from Hopper on). :func:`cudnn_problem` says
which condition a call breaks; the selector uses blockwise attention there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CUDNN_DTYPES = ("bfloat16", "float16")


def cudnn_problem(*, platform: str, T: int, S: int, head_dim: int, dtype, index_aligned: bool, packed: bool,
                  padded: bool) -> str | None:
  """Why cuDNN attention cannot run this call, or None."""
  if platform != "gpu":
    return f"it is a GPU kernel and the devices are {platform}"
  if not index_aligned or T != S:
    return "it masks by index, so it needs self-attention without a KV cache (prefill and decode read one)"
  if packed:
    return "it has no segment ids, so it cannot keep packed documents apart"
  if padded:
    return "it cannot mask left padding (only trailing lengths); give no attention mask"
  if jnp.dtype(dtype).name not in CUDNN_DTYPES:
    return f"it computes in bfloat16/float16, not {jnp.dtype(dtype).name} (set dtype='bfloat16')"
  if head_dim % 8 or head_dim > 256:
    return f"head dim {head_dim} is not a multiple of 8 up to 256"
  return None


def cudnn_arguments(sliding_window: int | None) -> dict:
  """The keyword arguments that make cuDNN's mask equal ours (causal, window W -> (W-1, 0))."""
  kw = dict(is_causal=True, implementation="cudnn")
  if sliding_window is not None:
    kw["local_window_size"] = (sliding_window - 1, 0)
  return kw


def cudnn_attention(q_BTNH, k_BTKH, v_BTKH, *, sliding_window=None) -> jax.Array:
  """Causal (windowed) self-attention by cuDNN; see the module docstring for when it equals ours."""
  with jax.named_scope("cudnn_attention"):
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, **cudnn_arguments(sliding_window))
