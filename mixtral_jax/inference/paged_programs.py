"""The compiled step over a paged KV cache: one program for prefill chunks and decode steps alike.

``run(state, ids_RC, positions_RC, valid_RC, cache, last_R, layers, adapter_R)`` runs the model over R
rows of C columns (:class:`mixtral_jax.inference.paged_batch.StepArrays`: a prefill chunk is R = 1, C = the chunk
bucket; a decode step is R = a compiled batch size, C = 1), each layer writing its new keys/values into
the rows' pages and attending through the page tables (:mod:`mixtral_jax.attn.paged`), and returns the
float32 logits at column ``last_R`` of each row ``[R, V]`` and the cache (donated: the pools are updated
in place). ``adapter_R`` (int32 [R], or None): each row's adapter slot when the model serves a bank of
adapters (``mixtral_jax.lora.bank``; 0 is the base). Sampling, grammar masks and logprobs run on those
logits in their own small programs, so a mask computed on the host while this one runs is applied without
a second model call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.attn.paged import PagedKVCache


@functools.lru_cache(maxsize=16)
def paged_step_program(graphdef):
  """The jitted paged step of one model structure (see the module docstring)."""

  @functools.partial(jax.jit, donate_argnums=(4,))
  def run(state, ids_RC, positions_RC, valid_RC, cache: PagedKVCache, last_R, layers=None, adapter_R=None):
    model = nnx.merge(graphdef, state)
    h_RCD, aux = model.hidden(ids_RC, attention_mask=valid_RC, positions=jnp.maximum(positions_RC, 0), cache=cache,
                              layers=layers, adapter_B=adapter_R)
    h_R1D = jnp.take_along_axis(h_RCD, last_R[:, None, None], axis=1)
    return model.logits(h_R1D, adapter_R)[:, 0], aux["cache"]

  return run
