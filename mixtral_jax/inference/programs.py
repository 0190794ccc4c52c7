"""The two compiled programs of generation, shared by ``generate``, the server's engine and ``plan
--generate``: a prefill chunk and a decode chunk, both over the whole stacked KV cache ``[L, B, S, K, H]``
(donated, so updated in place) with per-row sampling (:func:`mixtral_jax.sampling.sample_rows`).

Prefill (:func:`prefill_program`): ``C`` prompt columns of ``R`` rows. Row r's columns are tokens at
``positions_RC`` (``valid_RC`` marks real ones; pads write nothing), it forgets its row's old
contents first when ``reset_R`` (a reused row), and it samples its next token from column
``last_R``. With ``rows_R`` None the R rows are the cache's B rows (a batch prefill; rows not
prefilling pass no valid column and are left as they are), and the cache is written in place. With
``rows_R`` the R rows are cut out of the cache, run, and written back (one request joining a batch).
``layers``: as for decode; a chunk of at most ``moe_block`` tokens then runs every expert over its
weights in place (``mixtral_jax.moe``), as the decode step does.

Decode (:func:`decode_program`): ``n`` <= MAX_CHUNK steps in a ``fori_loop`` on device, step j feeding
token t_j at position p + j and sampling t_{j+1} with step ``step_B + j``; rows not ``active_B`` write
nothing. ``n`` is traced, so every chunk length shares one compilation. ``layers`` are the optional
per-layer weight views of a single CPU device (:mod:`mixtral_jax.inference.placement`).

Both programs are built once per model structure (graphdef) and bound in a cached jitted closure rather
than taking the graphdef as a static argument: jit hashes and compares static arguments on every call,
which for a graphdef is as slow as the rest of a dispatch. :func:`lower_prefill` and
:func:`lower_decode` lower them from abstract shapes (``plan --generate``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model import KVCache
from mixtral_jax.attention import LayerCache
from mixtral_jax.sampling import RowSettings, sample_rows

MAX_CHUNK = 16  # decode steps per device call, at most
CHUNK_SECONDS = 0.1  # device time per decode call the engines aim at, about


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return 1 << (max(n, minimum) - 1).bit_length()


@functools.lru_cache(maxsize=16)
def prefill_program(graphdef):
  """The jitted prefill chunk of one model structure (see the module docstring). Returns (the next
  token of each of the R rows [R], the cache)."""

  @functools.partial(jax.jit, donate_argnums=(4,))
  def run(state, ids_RC, positions_RC, valid_RC, cache: KVCache, rows_R, reset_R, last_R, settings: RowSettings,
          layers=None):
    model = nnx.merge(graphdef, state)
    part = cache if rows_R is None else _cut_rows(cache, rows_R)
    part = KVCache(part.layers, jnp.where(reset_R[:, None], -1, part.pos))
    h_RCD, aux = model.hidden(ids_RC, attention_mask=valid_RC, positions=positions_RC, cache=part, layers=layers)
    h_R1D = jnp.take_along_axis(h_RCD, last_R[:, None, None], axis=1)
    tokens_R = sample_rows(model.logits(h_R1D)[:, 0], settings, 0)
    new = aux["cache"]
    return tokens_R, new if rows_R is None else _put_rows(cache, new, rows_R)

  return run


def _cut_rows(cache: KVCache, rows_R) -> KVCache:
  """Rows ``rows_R`` of the cache, as a cache of R rows (a copy of R rows, not of the cache)."""
  return KVCache(LayerCache(cache.layers.k[:, rows_R], cache.layers.v[:, rows_R]), cache.pos[rows_R])


def _put_rows(cache: KVCache, part: KVCache, rows_R) -> KVCache:
  """The cache with ``part``'s R rows written back at ``rows_R``, one ``dynamic_update_slice`` per row
  (a scatter would make XLA:CPU convert a bfloat16 cache whole, see ``attention._write_row``)."""
  k, v, pos = cache.layers.k, cache.layers.v, cache.pos
  for r in range(rows_R.shape[0]):
    put = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        buf, jax.lax.slice_in_dim(new, r, r + 1, axis=axis), rows_R[r], axis=axis)
    k, v, pos = put(k, part.layers.k, 1), put(v, part.layers.v, 1), put(pos, part.pos, 0)
  return KVCache(LayerCache(k, v), pos)


@functools.lru_cache(maxsize=16)
def decode_program(graphdef):
  """The jitted decode chunk of one model structure (see the module docstring). Returns (the new
  tokens, step j in row j of [MAX_CHUNK, B], the last ones [B], the cache)."""

  @functools.partial(jax.jit, donate_argnums=(3,))
  def run(state, tokens_B, positions_B, cache, active_B, settings: RowSettings, step_B, n, layers):
    def body(j, carry):
      # The parameters ride in the carry (unchanged): nnx's layer scan rejects modules closed over
      # from outside the loop's trace.
      tokens_B, cache, out_CB, state = carry
      model = nnx.merge(graphdef, state)
      h_B1D, aux = model.hidden(tokens_B[:, None], attention_mask=active_B[:, None],
                                positions=(positions_B + j)[:, None], cache=cache, layers=layers)
      tokens_B = sample_rows(model.logits(h_B1D)[:, 0], settings, step_B + j)
      return tokens_B, aux["cache"], out_CB.at[j].set(tokens_B), state

    out_CB = jnp.zeros((MAX_CHUNK, tokens_B.shape[0]), jnp.int32)
    tokens_B, cache, out_CB, _ = jax.lax.fori_loop(0, n, body, (tokens_B, cache, out_CB, state))
    return out_CB, tokens_B, cache

  return run


def lower_prefill(graphdef, state, cache, chunk: int, rows_sharding=None):
  """The batch prefill chunk (all B rows, ``chunk`` columns) lowered from abstract ``state`` and
  ``cache`` (``jax.ShapeDtypeStruct``s; under the caller's mesh)."""
  B = cache.pos.shape[0]
  ids = jax.ShapeDtypeStruct((B, chunk), jnp.int32, sharding=rows_sharding)
  row = _row_sharding(rows_sharding)
  vec = lambda dt: jax.ShapeDtypeStruct((B,), dt, sharding=row)  # noqa: E731
  return prefill_program(graphdef).lower(state, ids, ids, jax.ShapeDtypeStruct((B, chunk), jnp.bool_, sharding=rows_sharding),
                                         cache, None, vec(jnp.bool_), vec(jnp.int32), RowSettings.abstract(B, row))


def lower_decode(graphdef, state, cache, rows_sharding=None, layers=None):
  """The decode chunk over all B rows lowered from abstract ``state`` and ``cache``."""
  B = cache.pos.shape[0]
  row = _row_sharding(rows_sharding)
  vec = lambda dt: jax.ShapeDtypeStruct((B,), dt, sharding=row)  # noqa: E731
  replicated = None if row is None else jax.sharding.NamedSharding(row.mesh, jax.sharding.PartitionSpec())
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  return decode_program(graphdef).lower(state, vec(jnp.int32), vec(jnp.int32), cache, vec(jnp.bool_),
                                        RowSettings.abstract(B, row), vec(jnp.int32), scalar, layers)


def _row_sharding(rows_sharding):
  """The sharding of a per-row vector [B] given that of a [B, C] array (its first axis)."""
  if rows_sharding is None:
    return None
  return jax.sharding.NamedSharding(rows_sharding.mesh, jax.sharding.PartitionSpec(rows_sharding.spec[0]))
