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

:func:`paged_decode_program` is the decode step run ``n`` times in one device call (a ``fori_loop``, as
the fixed-row engine's decode chunk): step j feeds each row's token at ``positions_R + j``, writes its
keys/values into the pages the row already holds (the caller picks n so that no row crosses the end of
its pages, and no host work is needed between steps: no grammar mask, no logprobs), and samples the next
token with :func:`mixtral_jax.sampling.sample_rows` at step ``step_R + j``. One dispatch per n tokens
instead of per token: on a small model the host's share of a one-token step is most of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.attn.paged import PagedKVCache
from mixtral_jax.sampling import RowSettings, sample_rows

MAX_STEPS = 16  # decode steps per device call, at most (the fixed-row engine's MAX_CHUNK)


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


@functools.lru_cache(maxsize=16)
def paged_decode_program(graphdef):
  """The jitted multi-step paged decode of one model structure (see the module docstring).

  ``run(state, tokens_R, positions_R, cache, settings, step_R, n, layers, adapter_R)``: rows with
  ``positions_R`` -1 are padding (they write into the null page and read nothing); ``cache.kv_len`` is
  the rows' filled length after the first step's write. ``n`` is traced (one compilation for every
  chunk length). Returns (the sampled tokens, step j in row j of ``[MAX_STEPS, R]``, the cache)."""

  @functools.partial(jax.jit, donate_argnums=(3,))
  def run(state, tokens_R, positions_R, cache: PagedKVCache, settings: RowSettings, step_R, n, layers=None,
          adapter_R=None):
    live_R = positions_R >= 0

    def body(j, carry):
      # The parameters ride in the carry: nnx's layer scan rejects modules closed over from outside the loop.
      tokens_R, cache, out_SR, state = carry
      model = nnx.merge(graphdef, state)
      step_cache = PagedKVCache(cache.k, cache.v, cache.table, jnp.where(live_R, cache.kv_len + j, 0))
      h_R1D, aux = model.hidden(tokens_R[:, None], attention_mask=live_R[:, None],
                                positions=jnp.where(live_R, positions_R + j, 0)[:, None], cache=step_cache,
                                layers=layers, adapter_B=adapter_R)
      tokens_R = sample_rows(model.logits(h_R1D, adapter_R)[:, 0], settings, step_R + j)
      new = aux["cache"]
      return tokens_R, PagedKVCache(new.k, new.v, cache.table, cache.kv_len), out_SR.at[j].set(tokens_R), state

    out_SR = jnp.zeros((MAX_STEPS, tokens_R.shape[0]), jnp.int32)
    _, cache, out_SR, _ = jax.lax.fori_loop(0, n, body, (tokens_R, cache, out_SR, state))
    return out_SR, cache

  return run
