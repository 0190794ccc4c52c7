"""Attention implementations side by side, behind one selector (:func:`attend`).

``mask`` (the position/segment/window rule), ``dense`` (the reference), ``blockwise`` (pure-JAX flash
attention), ``splash`` (TPU Pallas), ``cudnn`` (GPU), ``select`` (``attention_impl`` and ``auto``),
``paged`` (keys/values in a page pool read through page tables: the paged KV cache's read and write).
"""

from mixtral_jax.attn.blockwise import blockwise_attention
from mixtral_jax.attn.dense import dense_attention, dot_product_attention
from mixtral_jax.attn.mask import attention_mask, live_blocks, visible
from mixtral_jax.attn.select import DENSE_MAX_KEYS, DENSE_MAX_SCORES, IMPLS, attend, choose

__all__ = ["DENSE_MAX_KEYS", "DENSE_MAX_SCORES", "IMPLS", "attend", "attention_mask", "blockwise_attention", "choose",
           "dense_attention", "dot_product_attention", "live_blocks", "visible"]
