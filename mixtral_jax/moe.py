"""The sparse mixture-of-experts block: router, dispatch, experts, combine.

Single-device dispatch (this file). Expert-parallel dispatch across devices lives in
``sharding.expert_parallel`` and is selected when the current mesh has an ``expert`` axis > 1; both
call the same routing functions (``mixtral_jax.routing``) and the same expert FFN kernels
(``mixtral_jax.experts``).

Dropless (``capacity_factor=None``): the N*k routed pairs are sorted by expert into a compact
[N*k, D] layout and run through the grouped FFN, which does work proportional to the true group sizes.

Small decode batches (dropless, N*k <= 2E): each chosen expert's weights are sliced at its dynamic id
(or, given per-expert arrays, picked by a ``lax.switch`` so the matmuls read them in place) and run on
the few tokens, so a step reads only the chosen experts (``dispatch_selected``). Given per-expert
arrays, batches of up to ``moe_block`` tokens (a 16-row decode step, a short prefill chunk) take it too:
then every expert runs on every token, its weights read in place (``_selects``).

Dropping (``capacity_factor=cf``): pairs of rank < C = ceil(cf*N*k/E) are scattered into [E, C, D]
buckets and run as one batched einsum (or, on CPU, the blocked kernel over each bucket's filled rows);
later pairs contribute zero (no renormalisation).

LoRA on the experts (``lora``, an ``ExpertLoRA``) is passed to whichever kernel runs and applied there to
each row, ``x W_e + (drop(x) A_e) B_e``, with the row's pair id ``n * k + slot`` for its dropout mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mixtral_jax import param_paths, routing
from mixtral_jax.config import MixtralConfig
from mixtral_jax.expert_adapters import ExpertLoRA, project
from mixtral_jax.expert_dequant import dense_expert_ffn_dequant, is_stored_quantized, num_experts
from mixtral_jax.experts import EXPERT_OUT, dense_expert_ffn, grouped_expert_ffn, resolve_impl
from mixtral_jax.layers import registry_param
from mixtral_jax.lora import adapters as lora
from mixtral_jax.projection import Projection
from mixtral_jax.quant import as_compute, stored_weight


def _needs_rows(lora: ExpertLoRA | None) -> bool:
  """Whether the kernels need each row's pair id (for its dropout mask or its adapter in a bank)."""
  return lora is not None and lora.needs_rows


def dispatch_dropless(x_ND, weights_Nk, ids_Nk, w1_EDF, w3_EDF, w2_EFD, *, impl="auto", block=128,
                      lora: ExpertLoRA | None = None):
  """Sorted-by-expert dropless dispatch on one device. Returns y_ND (in x's dtype)."""
  N, D = x_ND.shape
  E = w1_EDF.shape[0]
  k = ids_Nk.shape[1]
  order_M, counts_E, starts_E = routing.sort_by_expert(ids_Nk, E)
  x_MD = x_ND[order_M // k]  # row r holds the token of sorted pair r (pair id order_M[r])
  y_MD = grouped_expert_ffn(x_MD, starts_E, counts_E, w1_EDF, w3_EDF, w2_EFD, impl=impl, block=block,
                            contiguous=True, lora=lora, rows_M=order_M if _needs_rows(lora) else None)
  inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(N * k, dtype=order_M.dtype))
  y_NkD = y_MD[inverse_M].reshape(N, k, D)
  return combine(y_NkD, weights_Nk)


def dispatch_selected(x_ND, weights_Nk, ids_Nk, w1_EDF, w3_EDF, w2_EFD, experts=None,
                      lora: ExpertLoRA | None = None):
  """Small-batch (decode) dropless dispatch that reads only the experts some token chose.

  With W_NE the weight token n gives expert e (0 when not routed there), y_n = sum_e W_ne * FFN_e(x_n).
  The at most M = min(E, N*k) chosen experts are listed first (ids in order, then unchosen ones as
  filler); slot j runs expert e_j on all N tokens, weighted by W_N[e_j] (all zero for a filler).
  Decode is memory-bound: each step reads M experts' weights once instead of all E. The FLOPs on
  tokens that did not choose e_j (at most E/k times the routed work) are cheap at small N. Used when
  N*k <= 2E, and with ``experts`` when N <= moe_block (see ``_selects``).

  How slot j gets expert e_j's weights: from the stacked [E, ...] arrays, a slice at the dynamic id,
  which XLA:CPU copies out before the matmul reads it. With ``experts`` (a tuple of E per-expert
  arrays for each of w1, w3, w2, e.g. :func:`mixtral_jax.model.layer_views`), a ``lax.switch`` on the
  id runs a branch whose matmuls read expert e_j's own array in place; and when M == E every expert
  runs anyway, so the slots are simply the experts in order (no switch).

  With ``lora``, slot j adds expert e_j's adapters (sliced at its id) to its rows; a token's row there
  has the pair id of its slot that chose e_j (for the dropout mask; tokens that did not choose e_j are
  weighted by zero).
  """
  N, D = x_ND.shape
  E = w1_EDF.shape[0]
  W_NE = jnp.sum(jax.nn.one_hot(ids_Nk, E, dtype=jnp.float32) * weights_Nk[..., None].astype(jnp.float32), axis=1)
  chosen_E = jnp.zeros((E,), bool).at[ids_Nk.reshape(-1)].set(True)
  M = min(E, ids_Nk.size)
  slots_M = jnp.argsort(~chosen_E, stable=True)[:M]

  k = ids_Nk.shape[1]

  def ffn(w1_DF, w3_DF, w2_FD, x_ND, e=None):
    if lora is None:
      h_NF = jax.nn.silu(x_ND @ w1_DF) * (x_ND @ w3_DF)
      return (h_NF @ w2_FD).astype(jnp.float32)
    lo = lora.expert(e)
    rows_N = None
    if lora.needs_rows:  # the pair (n, slot) of token n that chose e
      rows_N = jnp.arange(N) * k + jnp.argmax(ids_Nk == e, axis=1)
    a1_NF = project(lo, "w1", x_ND, x_ND @ w1_DF, rows_N)
    a3_NF = project(lo, "w3", x_ND, x_ND @ w3_DF, rows_N)
    h_NF = jax.nn.silu(a1_NF) * a3_NF
    return project(lo, "w2", h_NF, h_NF @ w2_FD, rows_N).astype(jnp.float32)

  # Expert i's FFN on its own arrays, for the per-expert path (built once; traced per use).
  branches = None if experts is None else [
      functools.partial(ffn, *(as_compute(ws[i], x_ND.dtype) for ws in experts), e=i) for i in range(E)]
  y_ND = jnp.zeros((N, D), jnp.float32)
  for j in range(M):
    if branches is not None and M == E:
      e, y_j = j, branches[j](x_ND)
    elif branches is not None:
      e = slots_M[j]
      y_j = jax.lax.switch(e, branches, x_ND)
    else:
      e = slots_M[j]
      y_j = ffn(*(jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in (w1_EDF, w3_EDF, w2_EFD)), x_ND, e)
    y_ND = y_ND + jnp.take(W_NE, e, axis=1)[:, None] * y_j
  return y_ND.astype(x_ND.dtype)


def _selects(N: int, cfg: MixtralConfig, experts) -> bool:
  """Whether N tokens take :func:`dispatch_selected`: when N*k <= 2E (few experts chosen), and, given
  per-expert weight views, for any N up to one ``moe_block``. Why the second: the blocked kernel
  computes a whole ``moe_block`` of rows for every expert that got a token and copies each expert's
  weight slice first, while every expert over N <= moe_block tokens read in place was 3.4x faster at
  N = 16 and 1.7x at N = 128 on XLA:CPU (docs/benchmarks.md, "16-row decode on one CPU device")."""
  if N * cfg.num_experts_per_tok <= 2 * cfg.num_local_experts:
    return True
  return experts is not None and N <= cfg.moe_block


def combine(y_NkD, weights_Nk):
  """y_ND = sum_k w_Nk * y_NkD, the weighting in float32 as transformers does, then cast back."""
  y_NkD = checkpoint_name(y_NkD, EXPERT_OUT)  # what the router's gradient needs (remat can keep it)
  out = jnp.einsum("nkd,nk->nd", y_NkD.astype(jnp.float32), weights_Nk.astype(jnp.float32))
  return out.astype(y_NkD.dtype)


def bucket(x_ND, ids_Nk, capacity: int, num_experts: int):
  """Scatters the routed pairs into [E, C, D] buckets by rank; pairs of rank >= C are dropped.

  Returns (x_ECD, kept_Nk bool, rank_Nk, counts_E)."""
  N, D = x_ND.shape
  k = ids_Nk.shape[1]
  rank_Nk, counts_E = routing.expert_ranks(ids_Nk, num_experts)
  kept_Nk = rank_Nk < capacity
  slot_Nk = jnp.where(kept_Nk, ids_Nk * capacity + rank_Nk, num_experts * capacity)  # OOB => dropped
  x_NkD = jnp.broadcast_to(x_ND[:, None, :], (N, k, D))
  x_MD = jnp.zeros((num_experts * capacity, D), x_ND.dtype).at[slot_Nk.reshape(-1)].set(
      x_NkD.reshape(-1, D), mode="drop")
  return x_MD.reshape(num_experts, capacity, D), kept_Nk, rank_Nk, counts_E


def unbucket(y_ECD, ids_Nk, rank_Nk, kept_Nk):
  """Gathers each pair's expert output back from the buckets; dropped pairs get zero. -> y_NkD."""
  E, C, D = y_ECD.shape
  slot_Nk = jnp.where(kept_Nk, ids_Nk * C + rank_Nk, 0)
  y_NkD = y_ECD.reshape(E * C, D)[slot_Nk]
  return jnp.where(kept_Nk[..., None], y_NkD, 0)


def dispatch_capacity(x_ND, weights_Nk, ids_Nk, w1_EDF, w3_EDF, w2_EFD, *, capacity: int, impl="dense",
                      block=128, lora: ExpertLoRA | None = None):
  """Capacity-bucketed (dropping) dispatch on one device. Returns (y_ND, dropped fraction).

  ``impl="blocked"`` (the CPU default) runs each bucket only over its filled rows, so work follows the
  routed load (at most N*k rows) instead of the E*C bucket slots; otherwise one batched einsum, or, for
  weights in ``quant.stored`` form (a quantized frozen base), one expert at a time dequantized inside a
  checkpoint (``mixtral_jax.expert_dequant``)."""
  E, C = num_experts(w1_EDF), capacity
  x_ECD, kept_Nk, rank_Nk, counts_E = bucket(x_ND, ids_Nk, capacity, E)
  rows_EC = None
  if _needs_rows(lora):  # each bucket row's pair id (-1: empty)
    N, k = ids_Nk.shape
    slot_M = jnp.where(kept_Nk, ids_Nk * C + rank_Nk, E * C).reshape(-1)
    rows_EC = jnp.full((E * C,), -1, jnp.int32).at[slot_M].set(jnp.arange(N * k, dtype=jnp.int32),
                                                               mode="drop").reshape(E, C)
  if resolve_impl(impl) == "blocked":
    starts_E = jnp.arange(E, dtype=jnp.int32) * C
    y_MD = grouped_expert_ffn(x_ECD.reshape(E * C, -1), starts_E, jnp.minimum(counts_E, C), w1_EDF, w3_EDF,
                              w2_EFD, impl="blocked", block=block, lora=lora,
                              rows_M=None if rows_EC is None else rows_EC.reshape(-1))
    y_ECD = y_MD.reshape(x_ECD.shape)
  elif is_stored_quantized(w1_EDF):
    y_ECD = dense_expert_ffn_dequant(x_ECD, w1_EDF, w3_EDF, w2_EFD, lora, rows_EC)
  else:
    y_ECD = dense_expert_ffn(x_ECD, w1_EDF, w3_EDF, w2_EFD, lora, rows_EC)
  y_ND = combine(unbucket(y_ECD, ids_Nk, rank_Nk, kept_Nk), weights_Nk)
  return y_ND, jnp.mean((~kept_Nk).astype(jnp.float32))


def _expert_mesh_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "expert" not in mesh.axis_names:
    return 1
  return mesh.shape["expert"]


class MoE(nnx.Module):
  """Router [D, E]; experts w1, w3 [E, D, F] and w2 [E, F, D] (``mixtral_jax.param_paths``)."""

  router = Projection("router", "nd,de->ne")

  def __init__(self, cfg: MixtralConfig, *, rngs: nnx.Rngs, lora_cfg=None):
    self.router.init(cfg, rngs)
    for id_ in param_paths.EXPERT_IDS:
      setattr(self, param_paths.attr(id_), registry_param(id_, cfg, rngs))
    self.lora = lora.make("moe", cfg, lora_cfg)  # LoRA adapters on router, w1, w3, w2 (or None)
    self.cfg = cfg

  def __call__(self, x_BTD, mask_BT=None, experts=None, lora_key=None, adapter_B=None):
    """Returns (y_BTD, router_logits_BTE float32, stats) with stats = {load_E, dropped}.

    ``experts``: optional per-expert views of this layer's weights for small-batch dispatch (see
    :func:`dispatch_selected`); the other paths use the stacked parameters. ``lora_key``: this layer's
    LoRA dropout key (training with ``lora.dropout > 0``), or None. ``adapter_B``: each batch row's adapter
    slot when the adapters are a serving bank (``mixtral_jax.lora.bank``)."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D).astype(dt)
    logits_NE = self.router(x_ND, lora_key, adapter_B=adapter_B).astype(jnp.float32)  # x W (+ LoRA)
    weights_Nk, ids_Nk = routing.top_k_route(logits_NE, cfg.num_experts_per_tok)
    ws = tuple(stored_weight(self, param_paths.attr(id_)) for id_ in param_paths.EXPERT_IDS)
    # A quantized base on the single-device bucketed batched path stays stored, to be dequantized expert
    # by expert inside the expert computation (mixtral_jax.expert_dequant); elsewhere the layer's experts
    # are dequantized here, whole.
    per_expert = (any(map(is_stored_quantized, ws)) and cfg.capacity_factor is not None
                  and _expert_mesh_size() == 1 and resolve_impl(cfg.moe_impl) != "blocked")
    w1, w3, w2 = ws if per_expert else (as_compute(w, dt) for w in ws)
    # LoRA: per-expert adapters (or None), applied by whichever dispatch runs, inside its expert computation.
    k = cfg.num_experts_per_tok
    pair_adapter = None if adapter_B is None else jnp.repeat(adapter_B, T * k, total_repeat_length=B * T * k)
    lo = lora.expert_adapters(self.lora, lora_key, pair_adapter)

    if _expert_mesh_size() > 1:
      if lo is not None and lo.pair_adapter is not None:
        raise ValueError("per-row adapters (serve --adapter) are not applied on an expert-parallel mesh yet; "
                         "serve them on one device or a mesh without an expert axis")
      from mixtral_jax.sharding import expert_parallel  # layer 1; imported lazily only for clarity
      y_ND, dropped = expert_parallel.moe_expert_parallel(
          x_ND, weights_Nk, ids_Nk, w1, w3, w2, capacity_factor=cfg.capacity_factor,
          impl=cfg.moe_impl, block=cfg.moe_block, lora=lo)
    elif cfg.capacity_factor is None and _selects(B * T, cfg, experts):
      y_ND = dispatch_selected(x_ND, weights_Nk, ids_Nk, w1, w3, w2, experts, lora=lo)
      dropped = jnp.zeros((), jnp.float32)
    elif cfg.capacity_factor is None:
      y_ND = dispatch_dropless(x_ND, weights_Nk, ids_Nk, w1, w3, w2, impl=cfg.moe_impl, block=cfg.moe_block,
                               lora=lo)
      dropped = jnp.zeros((), jnp.float32)
    else:
      C = routing.capacity(B * T, cfg.num_experts_per_tok, cfg.num_local_experts, cfg.capacity_factor)
      y_ND, dropped = dispatch_capacity(x_ND, weights_Nk, ids_Nk, w1, w3, w2, capacity=C, impl=cfg.moe_impl,
                                        block=cfg.moe_block, lora=lo)

    mask_N = None if mask_BT is None else mask_BT.reshape(-1)
    stats = {"load": routing.load_fractions(ids_Nk, cfg.num_local_experts, mask_N), "dropped": dropped}
    return y_ND.reshape(B, T, D), logits_NE.reshape(B, T, -1), stats
