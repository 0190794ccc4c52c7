"""The Mixtral decoder: embedding, a scanned stack of (attention, MoE) blocks, final norm, LM head.

  h = embed[ids]
  for each layer:  h = h + Attn(RMSNorm(h));  h = h + MoE(RMSNorm(h))
  logits = RMSNorm(h) @ head

The stack is built once with ``nnx.vmap`` (every block parameter gains a leading ``layers`` axis) and
run with ``nnx.scan``, so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mixtral_jax.attention import Attention
from mixtral_jax import kv_cache
from mixtral_jax.attn.paged import PagedKVCache
from mixtral_jax.kv_cache import KVCache, LayerCache, init_cache, rows_at_slots, written_positions  # noqa: F401  (re-exported)
from mixtral_jax.config import MixtralConfig
from mixtral_jax.experts import EXPERT_GATE, EXPERT_IN, EXPERT_OUT, EXPERT_UP
from mixtral_jax import param_paths
from mixtral_jax.layers import LOGICAL_AXES, RMSNorm, registry_param
from mixtral_jax.lora import adapters as lora
from mixtral_jax.moe import MoE
from mixtral_jax.projection import Projection
from mixtral_jax.quant import stored
from mixtral_jax.sharding.rules import constrain

# Activations a block names with ``checkpoint_name`` so that remat policies can keep them by name:
# the attention output (after the output projection) and the MoE block's input (the normalised hidden
# state that the router reads and the expert FFNs are dispatched from).
ATTN_OUT, MOE_IN = "attn_out", "moe_in"
_cp = jax.checkpoint_policies

# What to keep for the backward pass of each block (``MixtralConfig.remat``), from most kept to least.
# The backward recomputes whatever a policy does not keep, from the block's input (which the layer
# scan always keeps).
REMAT_POLICIES = {
    "none": None,  # keep everything: no recompute, most memory
    # every projection: q/k/v/o and the router (matmuls without batch dimensions) and the expert FFN's
    # input rows and gate, up and down products (batched over experts, so kept by name,
    # ``experts.EXPERT_*``). The backward recomputes only attention scores and elementwise work, not
    # the token dispatch nor the expert matmuls (most of a layer's FLOPs); the expert products are the
    # memory it costs.
    "save_projections": _cp.save_from_both_policies(
        _cp.checkpoint_dots_with_no_batch_dims,
        _cp.save_only_these_names(EXPERT_IN, EXPERT_GATE, EXPERT_UP, EXPERT_OUT)),
    # the dense projections only (the older meaning of save_projections): the experts are recomputed
    "dots": _cp.checkpoint_dots_with_no_batch_dims,
    # the attention output and the MoE input: the backward recomputes each sublayer once, not the
    # attention again to reach the MoE block
    "save_attn_moe_in": _cp.save_only_these_names(ATTN_OUT, MOE_IN),
    # the same two kept in pinned host memory instead of device memory (TPU and GPU hosts, and CPU)
    "offload": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(ATTN_OUT, MOE_IN),
        offload_src="device", offload_dst="pinned_host"),
    # what save_projections keeps by name (the expert FFN's input rows, gate, up and output products)
    # and the attention output, all in pinned host memory: for sequences too long for those products
    # to stay in device memory, where gradient accumulation cannot help (one sequence per device). The
    # backward fetches them back instead of re-dispatching tokens and redoing the expert matmuls; it
    # recomputes q/k/v and attention (not named, so not kept), as save_projections recomputes attention.
    "offload_projections": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=(ATTN_OUT, EXPERT_IN, EXPERT_GATE, EXPERT_UP, EXPERT_OUT),
        offload_src="device", offload_dst="pinned_host"),
    # the same set split by size: the expert FFN's F-wide gate and up products (the bulk: 2F of every
    # routed row) go to pinned host memory, the D-wide tensors (expert input rows and outputs, attention
    # output) stay on the device; for when neither memory alone holds the whole set
    "offload_gate_up": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(ATTN_OUT, EXPERT_IN, EXPERT_OUT),
        names_which_can_be_offloaded=(EXPERT_GATE, EXPERT_UP),
        offload_src="device", offload_dst="pinned_host"),
    "full": _cp.nothing_saveable,  # keep only the block input: recompute the whole block
}
OFFLOADING = ("offload", "offload_projections", "offload_gate_up")  # the policies that need pinned host memory


_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def remat_policy(name: str, devices=None):
  """The checkpoint policy named ``name``; with ``devices``, also checks that an offloading policy has
  pinned host memory to go to. Unknown names and offload without host memory are refused in one line."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat {name!r}: no such policy; choose one of {', '.join(REMAT_POLICIES)}")
  if name in OFFLOADING and devices:
    try:
      kinds = {m.kind for m in devices[0].addressable_memories()}
    except Exception:  # noqa: BLE001 - a backend without memory spaces
      kinds = set()
    if not kinds and devices[0].platform in _GPU_PLATFORMS:
      # XLA:GPU has pinned host memory; the deviceless topology devices of `plan --topology h100x8` just
      # list no memories (the compile places the offloaded activations in host memory, S(5), all the same).
      kinds = {"pinned_host"}
    if "pinned_host" not in kinds:
      raise ValueError(f"remat {name!r} needs pinned host memory, which {devices[0].platform} devices lack "
                       f"(memory kinds {sorted(kinds) or 'none'}); use remat save_attn_moe_in or full")
  return REMAT_POLICIES[name]

_STACK_METADATA = {nnx.PARTITION_NAME: None, LOGICAL_AXES: "layers"}


class Block(nnx.Module):
  def __init__(self, cfg: MixtralConfig, *, rngs: nnx.Rngs, lora_cfg=None):
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.attn = Attention(cfg, rngs=rngs, lora_cfg=lora_cfg)
    self.moe_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.moe = MoE(cfg, rngs=rngs, lora_cfg=lora_cfg)

  def __call__(self, h_BTD, positions_BT, valid_BT, segment_ids_BT, cache, cache_pos_BS, write_slots_BT,
               experts=None, layer=None, kept_rows=None, lora_key=None, adapter_B=None):
    a_BTD, new_cache = self.attn(self.attn_norm(h_BTD), positions_BT, valid_BT=valid_BT,
                                 segment_ids_BT=segment_ids_BT, cache=cache, cache_pos_BS=cache_pos_BS,
                                 write_slots_BT=write_slots_BT, layer=layer, kept_rows=kept_rows,
                                 lora_key=lora_key, adapter_B=adapter_B)
    h_BTD = h_BTD + checkpoint_name(a_BTD, ATTN_OUT)
    m_BTD, logits_BTE, stats = self.moe(checkpoint_name(self.moe_norm(h_BTD), MOE_IN), valid_BT, experts, lora_key,
                                        adapter_B)
    h_BTD = constrain(h_BTD + m_BTD, ("batch", "seq", "act_embed"))
    return h_BTD, new_cache, logits_BTE, stats


class Mixtral(nnx.Module):
  """Mixtral for causal LM. ``model(input_ids)`` -> float32 logits ``[B, T, V]``.

  ``lora_cfg`` (a ``mixtral_jax.lora.LoraSection``) adds LoRA adapters (see ``mixtral_jax.lora``)."""

  head = Projection("lm_head", "btd,dv->btv", lora_attr="lora_head")  # head_DV [D, V] and its adapter

  def __init__(self, cfg: MixtralConfig, *, rngs: nnx.Rngs, lora_cfg=None):
    D, L, pd = cfg.hidden_size, cfg.num_hidden_layers, jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed_VD = registry_param("embed", cfg, rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_STACK_METADATA)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs, lora_cfg=lora_cfg)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(D, cfg.rms_norm_eps, pd)
    self.head.init(cfg, rngs)
    self.lora_head = lora.make("head", cfg, lora_cfg)  # LoRA adapter on the LM head (or None)

  # ------------------------------------------------------------------------------ forward pieces

  def embed(self, input_ids_BT: jax.Array) -> jax.Array:
    # Gather the table's fsdp shards first (FSDP's own weight all-gather; its gradient is then
    # reduce-scattered). Looking up rows of the D-sharded table directly makes the backward
    # scatter-add want the [B, T, D] cotangent split over D, a resharding XLA can only do by
    # replicating it ("involuntary full rematerialization").
    table_VD = constrain(self.embed_VD[...], ("vocab", None))
    h = table_VD[input_ids_BT].astype(jnp.dtype(self.cfg.dtype))
    return constrain(h, ("batch", "seq", "act_embed"))

  def hidden(self, input_ids_BT, *, attention_mask=None, positions=None, segment_ids=None,
             cache: KVCache | None = None, unroll: bool = False, layers: list | None = None, lora_key=None,
             adapter_B=None):
    """Final-normed hidden states ``[B, T, D]`` and aux = {router_logits [L,B,T,E], load [L,E],
    dropped [L]} (plus ``cache`` when one is given).

    ``positions`` default to 0..T-1 (as transformers' forward); with a cache, to the cache's next
    positions is the caller's job (see ``mixtral_jax.generate``). ``unroll`` runs the layers in a Python
    loop instead of ``nnx.scan`` (for tests; same parameters, same maths). ``layers`` (from
    :func:`layer_views`) also unrolls, reading each layer's weights from its own arrays (CPU decode).
    ``lora_key``: LoRA dropout key (training only); each layer gets its own ``fold_in(key, layer)``.
    ``adapter_B`` int32 [B]: with a serving bank of adapters (``mixtral_jax.lora.bank``), each row's
    adapter slot (0: the base); a bank without it computes the base.
    """
    B, T = input_ids_BT.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = None if attention_mask is None else attention_mask.astype(bool)
    cache_pos = write_slots = layer_cache = kept = None
    paged = isinstance(cache, PagedKVCache)
    if paged:  # the pools ride in the layer loop's carry with their tables and lengths (attn/paged.py)
      if unroll:
        raise ValueError("unroll=True slices each layer's cache out, which a paged cache does not support; "
                         "run the scanned layers or pass layers=layer_views(model)")
      layer_cache = cache
    elif cache is not None:
      cache_pos, layer_cache = cache.pos, cache.layers
      write_slots = kv_cache.write_slots(positions, valid, cache.size)
      if T == 1 and not unroll:  # decode writes the stacked cache in place (see Attention)
        kept = rows_at_slots(layer_cache, write_slots)
    h = self.embed(input_ids_BT)
    if layers is not None:
      h, new_layers, logits, stats = self._run_views(layers, h, positions, valid, segment_ids, layer_cache,
                                                     cache_pos, write_slots, kept, adapter_B)
    else:
      h, new_layers, logits, stats = self._run_blocks(h, positions, valid, segment_ids, layer_cache, cache_pos,
                                                      write_slots, unroll, kept, lora_key, adapter_B)
    aux: dict[str, Any] = {"router_logits": logits, **stats}
    if paged:
      aux["cache"] = new_layers
    elif cache is not None:
      aux["cache"] = KVCache(new_layers, written_positions(cache.pos, write_slots, positions))
    return self.final_norm(h), aux

  def head_operands(self, h_BTD: jax.Array, lora_key=None, adapter_B=None) -> tuple[jax.Array, jax.Array]:
    """(h, W) with ``logits = h @ W``: the final hidden states and LM head weight [D, V] in the compute
    dtype, with the head's LoRA adapter folded in if there is one (``lora.head_operands``)."""
    dt = jnp.dtype(self.cfg.dtype)
    w_DV = self.head.operand(jnp.dtype(self.cfg.param_dtype)).astype(dt)
    return self.head.head_operands(h_BTD.astype(dt), w_DV, lora_key, adapter_B)

  def logits(self, h_BTD: jax.Array, adapter_B=None) -> jax.Array:
    h, w = self.head_operands(h_BTD, adapter_B=adapter_B)
    return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)

  def __call__(self, input_ids_BT, *, attention_mask=None, positions=None, segment_ids=None,
               return_router_logits: bool = False, adapter_B=None):
    """int32 [B, T] -> float32 logits [B, T, V]; with ``return_router_logits``, (logits, aux).
    ``adapter_B``: each row's adapter slot in a serving bank (see :meth:`hidden`)."""
    h, aux = self.hidden(input_ids_BT, attention_mask=attention_mask, positions=positions,
                         segment_ids=segment_ids, adapter_B=adapter_B)
    logits = self.logits(h, adapter_B)
    return (logits, aux) if return_router_logits else logits

  # ------------------------------------------------------------------------------ layer stack

  def _run_blocks(self, h, positions, valid, segment_ids, layer_cache, cache_pos, write_slots, unroll, kept=None,
                  lora_key=None, adapter_B=None):
    """The scanned layer stack. With a cache, the whole stacked ``[L, B, S, K, H]`` cache rides in the
    scan's carry with a layer counter, and layer i writes its slots into it in place
    (``Attention(layer=i)``): passing the layers' caches as the scan's xs and collecting the new ones as
    its ys would hold a second whole cache. ``unroll`` (tests) slices each layer's cache out and
    stacks the new ones: the reference for the in-place path. ``lora_key`` (training with LoRA dropout,
    no cache): layer i gets ``fold_in(lora_key, i)``, scanned beside its layer."""
    policy = remat_policy(self.cfg.remat)
    keys_L = None if lora_key is None else jax.vmap(lambda i: jax.random.fold_in(lora_key, i))(
        jnp.arange(self.cfg.num_hidden_layers))

    def checkpointed(body):
      return body if self.cfg.remat == "none" else nnx.remat(body, policy=policy, prevent_cse=False)

    def body(block: Block, h, layer_cache, key=None):
      h, new_cache, logits, stats = block(h, positions, valid, segment_ids, layer_cache, cache_pos,
                                          write_slots, lora_key=key, adapter_B=adapter_B)
      return h, (new_cache, logits, stats)

    body = checkpointed(body)
    if unroll:
      outs = []
      for i in range(self.cfg.num_hidden_layers):
        block = _layer(self.blocks, i)
        h, out = body(block, h, None if layer_cache is None else jax.tree.map(lambda a: a[i], layer_cache),
                      None if keys_L is None else keys_L[i])
        outs.append(out)
      new_cache, logits, stats = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
      return h, new_cache, logits, stats

    if layer_cache is None:
      scan = nnx.scan(body, in_axes=(0, nnx.Carry, None, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata=_STACK_METADATA)
      h, (_, logits, stats) = scan(self.blocks, h, None, keys_L)
      return h, None, logits, stats

    @checkpointed
    def cached_body(block: Block, carry, kept_rows):
      h, cache, i = carry
      h, cache, logits, stats = block(h, positions, valid, segment_ids, cache, cache_pos, write_slots, layer=i,
                                      kept_rows=kept_rows, adapter_B=adapter_B)
      return (h, cache, i + 1), (logits, stats)

    scan = nnx.scan(cached_body, in_axes=(0, nnx.Carry, 0 if kept is not None else None), out_axes=(nnx.Carry, 0),
                    transform_metadata=_STACK_METADATA)
    (h, new_cache, _), (logits, stats) = scan(self.blocks, (h, layer_cache, jnp.int32(0)), kept)
    return h, new_cache, logits, stats

  def _run_views(self, layers, h, positions, valid, segment_ids, layer_cache, cache_pos, write_slots, kept=None,
                 adapter_B=None):
    """The layer loop unrolled over :func:`layer_views`. Layer i writes its new keys/values straight
    into the stacked cache (in place when the cache is donated), not into a copy of its layer."""
    graphdef = nnx.graphdef(self.blocks)
    outs = []
    for i, (state, experts) in enumerate(layers):
      block = nnx.merge(graphdef, state)
      h, new_cache, logits, stats = block(h, positions, valid, segment_ids, layer_cache, cache_pos, write_slots,
                                          experts, layer=None if layer_cache is None else i,
                                          kept_rows=None if kept is None else jax.tree.map(lambda a: a[i], kept),
                                          adapter_B=adapter_B)
      layer_cache = new_cache
      outs.append((logits, stats))
    logits, stats = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return h, layer_cache, logits, stats


def layer_views(model: Mixtral) -> list:
  """Per layer: (that layer's Block state, (w1s, w3s, w2s) with one array per expert), every array a
  zero-copy view of the stacked parameters (single-device CPU only).

  Why: XLA:CPU copies a slice of an array out before a matmul can read it, so the scanned stack pays
  a copy of every weight it uses (a dynamic slice per layer, and per chosen expert). Arrays that are
  the whole of a jitted function's argument are read in place. NumPy views of the stacked buffers,
  put back on the CPU device without a copy (``jax.device_put`` aliases aligned host memory), give
  those arrays for free; the views keep the stacked arrays alive while they exist.
  """
  state = nnx.state(model.blocks)
  leaves, treedef = jax.tree.flatten(state)
  (device,) = {d for a in leaves for d in a.devices()}
  stacked = [np.asarray(a) for a in leaves]  # zero-copy on CPU
  moe = state["moe"]
  # A quantized expert is a (values, {suffix: array}) pair (see mixtral_jax.quant.as_compute).
  experts = [jax.tree.map(np.asarray, stored(moe, param_paths.attr(id_))) for id_ in param_paths.EXPERT_IDS]
  E = model.cfg.num_local_experts
  out = []
  for i in range(model.cfg.num_hidden_layers):
    # One batched device_put per layer; a misaligned view would be copied (still correct).
    layer, per_expert = jax.device_put(([a[i] for a in stacked], [[_at(w, i, e) for e in range(E)] for w in experts]),
                                       device)
    out.append((jax.tree.unflatten(treedef, layer), tuple(tuple(ws) for ws in per_expert)))
  return out


def _at(w, i, e):
  return jax.tree.map(lambda a: a[i, e], w)


def _layer(blocks: Block, i: int) -> Block:
  """Block i of the stacked blocks, as a standalone module (for the unrolled reference path)."""
  graphdef, state = nnx.split(blocks)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
