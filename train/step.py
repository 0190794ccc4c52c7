"""The one train step: forward, fused LM-head cross-entropy, load-balancing and z-loss, gradient
accumulation, global-norm clipping and AdamW, in a single ``jax.jit`` that donates the train state.

Contract (used by ``mixtral-jax plan`` to compile the real step from shapes alone)::

  from mixtral_jax.train import step
  step_fn, abstract_state, abstract_batch = step.build_train_step(model_cfg, train_cfg, mesh)
  compiled = step_fn.lower(abstract_state, abstract_batch).compile()   # nothing is allocated

``model_cfg`` is a ``MixtralConfig`` (its ``dtype``, ``remat``, ``capacity_factor`` apply),
``train_cfg`` a ``mixtral_jax.train.config.TrainConfig`` (batch size, sequence length, accumulation,
optimizer, loss options; ``TrainConfig().override({"data.batch_size": 256, "data.seq_len": 4096})``),
``mesh`` a ``jax.sharding.Mesh`` over the axes of ``mixtral_jax.sharding.mesh``. The abstract state and
batch are ``ShapeDtypeStruct``s carrying their ``NamedSharding``s. The step traces under the mesh by
itself (``use_abstract_mesh``), so lowering or calling it outside ``jax.set_mesh`` gives the same program.

State: fp32 master ``params`` (the tree ``nnx.state(model, nnx.Param).to_pure_dict()``, the checkpoint
layout), the optax state, the ``step`` counter and a raw ``rng`` key. Compute runs in
``model_cfg.dtype`` (bfloat16 for mixed precision); gradients and the update are in the param dtype.

LoRA (``train_cfg.lora.rank`` set): ``params`` are the adapters only (fp32, the tree of
``mixtral_jax.lora.LoRAParam`` variables), and ``base`` holds the frozen base weights in the compute
dtype. Only the adapters are differentiated, so the base has no gradient buffer and no optimizer state;
the step returns ``base`` untouched (donated in, aliased out). With ``lora.dropout > 0`` the adapters'
dropout draws from ``fold_in(fold_in(rng, step), microbatch)``: the checkpointed rng and the step fix
every mask, so a resumed run repeats the straight run exactly.

Batch: a dict of ``[A, b, T]`` arrays, A = ``optimizer.grad_accum`` microbatches of b sequences:
``inputs``/``targets`` int32 token ids, ``weights`` float32 loss weights (0 for padding, prompt tokens and
targets across document boundaries), ``segment_ids`` int32 (0 = padding; packed documents attend only
within their segment), ``positions`` int32 (restart at 0 in each document).

Loss per step: sum(w * nll) / sum(w) over the whole batch, plus ``router_aux_loss_coef`` times the
load-balancing loss and ``loss.z_loss_coef`` times the z-loss, both averaged over microbatches (each is
a ratio of batch statistics, so a microbatch computes its own, as an unaccumulated step would on it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mixtral_jax import lora as lora_lib
from mixtral_jax.config import MixtralConfig
from mixtral_jax.model import Mixtral
from mixtral_jax.params import abstract_model, param_shardings
from mixtral_jax.sharding.rules import logical_to_spec

from . import dpo as dpo_lib
from .config import OptimizerSection, TrainConfig
from .losses import lm_head_cross_entropy, load_balancing_loss, router_z_loss

BATCH_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32, "segment_ids": jnp.int32,
                "positions": jnp.int32}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: Any  # nested dict of arrays, the checkpoint's ``params`` tree
  opt_state: Any
  step: jax.Array  # int32 scalar: optimizer steps taken
  rng: jax.Array  # uint32 [2]: raw PRNG key, split once per step
  base: Any = None  # LoRA: the frozen base weights (compute dtype); None when training every weight


# ---------------------------------------------------------------------------- optimizer


def learning_rate_schedule(opt: OptimizerSection, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, then a cosine down to ``lr * min_lr_ratio``."""
  warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
  decay = opt.decay_steps if opt.decay_steps is not None else max(total_steps - warmup, 1)
  return optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, warmup + decay, end_value=opt.lr * opt.min_lr_ratio)


def _decays(params) -> Any:
  """Weight decay mask: every parameter except the RMSNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any("norm" in str(getattr(k, "key", "")) for k in path), params)


def make_optimizer(train_cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  opt = train_cfg.optimizer
  schedule = learning_rate_schedule(opt, train_cfg.train.steps)
  parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm else []
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=_decays))
  return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------- shapes and shardings


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Microbatch axis whole, sequences split over the batch mesh axes, tokens whole."""
  return NamedSharding(mesh, P(None, logical_to_spec(("batch",), mesh)[0], None))


def is_dpo(train_cfg: TrainConfig) -> bool:
  """Preference data: the step is DPO's (``mixtral_jax.train.dpo``) and a row holds a pair."""
  return train_cfg.data.format == "preference"


def abstract_batch(train_cfg: TrainConfig, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """``[A, b, T]`` fields; DPO: ``[A, b, 2T]``, each row a pair's chosen and rejected rows side by side
  (``mixtral_jax.train.data.preference.PairRows``), b pairs per microbatch."""
  T = train_cfg.data.seq_len * (2 if is_dpo(train_cfg) else 1)
  shape = (train_cfg.optimizer.grad_accum, train_cfg.microbatch, T)
  sh = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh) for k, dt in BATCH_FIELDS.items()}


def _lora(train_cfg: TrainConfig):
  return train_cfg.lora if train_cfg.lora.enabled else None


def base_config(model_cfg: MixtralConfig, lora) -> MixtralConfig:
  """LoRA holds the frozen base in the compute dtype."""
  return model_cfg if lora is None else model_cfg.replace(param_dtype=model_cfg.dtype)


@functools.lru_cache(maxsize=8)
def _param_template(model_cfg: MixtralConfig, lora=None):
  """(graphdef, abstract trainable State, abstract frozen State or None); never mutated (``_merge`` fills
  copies). With LoRA the trainable State is the adapters and the frozen one the base."""
  if lora is None:
    graphdef, state = nnx.split(abstract_model(model_cfg))
    return graphdef, state, None
  model = nnx.eval_shape(lambda: _quantized(Mixtral(base_config(model_cfg, lora), rngs=nnx.Rngs(0), lora_cfg=lora),
                                            lora))
  return nnx.split(model, lora_lib.LoRAParam, ...)


def _quantized(model: Mixtral, lora) -> Mixtral:
  """``lora.base_quantize`` set: the base's matmul weights in that stored form (int8, or nf4 for attention
  and experts), made operands layer by layer inside the scan; the adapters are untouched."""
  if lora is None or lora.base_quantize is None:
    return model
  from mixtral_jax.inference.quantize import quantize  # noqa: PLC0415
  return quantize(model, lora.base_quantize)


def state_shardings(model_cfg: MixtralConfig, tx, mesh: jax.sharding.Mesh, lora=None) -> TrainState:
  """Params by their logical axes; optimizer moments like their params; scalars replicated."""
  _, abs_state, abs_base = _param_template(model_cfg, lora)
  params_sh = param_shardings(abs_state, mesh).to_pure_dict()
  replicated = NamedSharding(mesh, P())
  abs_params = abs_state.to_pure_dict()
  opt_abs = jax.eval_shape(tx.init, abs_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, params_sh,
                                 transform_non_params=lambda _: replicated)
  base_sh = None if abs_base is None else param_shardings(abs_base, mesh).to_pure_dict()
  return TrainState(params=params_sh, opt_state=opt_sh, step=replicated, rng=replicated, base=base_sh)


def abstract_state(model_cfg: MixtralConfig, tx, mesh: jax.sharding.Mesh, lora=None) -> TrainState:
  _, abs_state, abs_base = _param_template(model_cfg, lora)
  abs_params = abs_state.to_pure_dict()
  shapes = TrainState(params=abs_params, opt_state=jax.eval_shape(tx.init, abs_params),
                      step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                      base=None if abs_base is None else abs_base.to_pure_dict())
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      state_shardings(model_cfg, tx, mesh, lora))


# ---------------------------------------------------------------------------- the loss


def _merge(graphdef, template, params, base_template=None, base=None) -> Mixtral:
  states = []
  for tmpl, tree in ((template, params), (base_template, base)):
    if tmpl is not None:
      state = jax.tree.map(lambda x: x, tmpl)  # a fresh State to fill: replace_by_pure_dict mutates
      nnx.replace_by_pure_dict(state, tree)
      states.append(state)
  return nnx.merge(graphdef, *states)


def microbatch_loss(model: Mixtral, mb: dict, train_cfg: TrainConfig, total_weight, num_microbatches: int,
                    lora_key=None):
  """This microbatch's share of the step loss, and its metrics (see the module docstring). ``lora_key``:
  the LoRA dropout key of this microbatch (None: no dropout)."""
  cfg, loss_cfg = model.cfg, train_cfg.loss
  valid_BT = mb["segment_ids"] > 0
  blocks_key, head_key = (None, None) if lora_key is None else jax.random.split(lora_key)
  h_BTD, aux = model.hidden(mb["inputs"], attention_mask=valid_BT, positions=mb["positions"],
                            segment_ids=mb["segment_ids"], lora_key=blocks_key)
  nll = lm_head_cross_entropy(*model.head_operands(h_BTD, head_key), mb["targets"], mb["weights"],
                              loss_cfg.ce_chunk, jnp.dtype(cfg.dtype))
  ce = nll / total_weight
  lb = load_balancing_loss(aux["router_logits"], cfg.num_experts_per_tok, valid_BT,
                           per_layer=loss_cfg.aux_mode == "per_layer")
  z = router_z_loss(aux["router_logits"], valid_BT)
  loss = ce + (cfg.router_aux_loss_coef * lb + loss_cfg.z_loss_coef * z) / num_microbatches
  metrics = {"ce_loss": ce, "aux_loss": lb / num_microbatches, "z_loss": z / num_microbatches,
             "expert_load": aux["load"] / num_microbatches, "dropped": aux["dropped"] / num_microbatches}
  return loss, metrics


def _pair_rows(mb: dict, train_cfg: TrainConfig) -> dict:
  from .data.preference import unflatten_pairs  # noqa: PLC0415
  return {k: unflatten_pairs(v, train_cfg.data.seq_len) for k, v in mb.items()}


def dpo_reference(model: Mixtral, mb: dict, train_cfg: TrainConfig):
  """The reference log-probs ``[2b]`` of a microbatch of pair rows ``[b, 2T]`` (adapters off, no gradient)."""
  return dpo_lib.reference_logprobs(model, _pair_rows(mb, train_cfg), train_cfg.loss.ce_chunk,
                                    train_cfg.dpo.loss_type == "ipo")


def dpo_microbatch_loss(model: Mixtral, mb: dict, train_cfg: TrainConfig, total_weight, num_microbatches: int,
                        lora_key=None, ref_B=None):
  """DPO's share of the step loss for a microbatch of pair rows ``[b, 2T]``: un-flattened to the chosen
  rows then the rejected rows ``[2b, T]``, scored with the adapters on, against ``ref_B``
  (:func:`dpo_reference`; computed inside when None) (:func:`mixtral_jax.train.dpo.microbatch_loss`).
  ``total_weight`` is unused: the loss is a mean over pairs."""
  del total_weight
  d = train_cfg.dpo
  return dpo_lib.microbatch_loss(model, _pair_rows(mb, train_cfg), beta=d.beta, label_smoothing=d.label_smoothing,
                                 loss_type=d.loss_type, chunk=train_cfg.loss.ce_chunk,
                                 num_microbatches=num_microbatches, lora_key=lora_key, ref_B=ref_B)


# ---------------------------------------------------------------------------- the step


def build_train_step(model_cfg: MixtralConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh
                     ) -> tuple[Callable, TrainState, dict]:
  """(jitted step(state, batch) -> (state, metrics), abstract state, abstract batch); see the module
  docstring. Metrics are float32 scalars (loss, ce_loss, aux_loss, z_loss, grad_norm, lr, tokens) plus
  expert_load [L, E] and dropped [L]."""
  tx, schedule = make_optimizer(train_cfg)
  lora = _lora(train_cfg)
  graphdef, template, base_template = _param_template(model_cfg, lora)
  A = train_cfg.optimizer.grad_accum
  abstract_mesh = mesh.abstract_mesh

  dropout = lora is not None and lora.dropout > 0

  loss_of = dpo_microbatch_loss if is_dpo(train_cfg) else microbatch_loss

  def grads_of(params, mb, total_weight, base, key):
    extra = {}
    if is_dpo(train_cfg):  # the reference forward outside the differentiated function: nothing of it is saved
      extra["ref_B"] = dpo_reference(_merge(graphdef, template, params, base_template, base), mb, train_cfg)

    def f(p):  # differentiated in the trainable params only (with LoRA, the adapters; never the base)
      return loss_of(_merge(graphdef, template, p, base_template, base), mb, train_cfg, total_weight, A, key, **extra)
    return jax.value_and_grad(f, has_aux=True)(params)

  def step(state: TrainState, batch: dict):
    with jax.sharding.use_abstract_mesh(abstract_mesh):
      total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
      # LoRA dropout keys: from the rng and the step, one per microbatch (None without dropout).
      step_key = jax.random.fold_in(state.rng, state.step) if dropout else None
      key_of = lambda i: None if step_key is None else jax.random.fold_in(step_key, i)  # noqa: E731
      if A == 1:
        (loss, metrics), grads = grads_of(state.params, jax.tree.map(lambda a: a[0], batch), total_weight,
                                          state.base, key_of(0))
      else:  # one traced copy of the gradient, summed over microbatches by a scan
        def body(carry, xs):
          mb, i = xs
          return jax.tree.map(jnp.add, carry, grads_of(state.params, mb, total_weight, state.base, key_of(i))), None
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(grads_of, state.params, jax.tree.map(lambda a: a[0], batch), total_weight,
                                            state.base, key_of(0)))
        (loss, metrics), grads = jax.lax.scan(body, zeros, (batch, jnp.arange(A)))[0]
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      rng, _ = jax.random.split(state.rng)
      metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
                 "tokens": total_weight}
      return TrainState(params, opt_state, state.step + 1, rng, state.base), metrics

  shardings = state_shardings(model_cfg, tx, mesh, lora)
  step_fn = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                    donate_argnums=0)
  return step_fn, abstract_state(model_cfg, tx, mesh, lora), abstract_batch(train_cfg, mesh)


def eval_params(state: TrainState):
  """What the eval step takes: the params, or with LoRA (adapters, base)."""
  return state.params if state.base is None else (state.params, state.base)


def build_eval_step(model_cfg: MixtralConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh) -> Callable:
  """jitted eval(params, batch) -> (sum of w * nll, sum of w) over all microbatches of ``batch``
  (``params`` as :func:`eval_params` gives them). DPO: (sum of the loss, microbatches, {accuracy,
  reward_margin, chosen_reward, rejected_reward: sums}), so held-out preference accuracy is logged too."""
  lora = _lora(train_cfg)
  graphdef, template, base_template = _param_template(model_cfg, lora)
  chunk, dtype = train_cfg.loss.ce_chunk, jnp.dtype(model_cfg.dtype)
  abstract_mesh = mesh.abstract_mesh

  def one(params, mb):
    model = (_merge(graphdef, template, params) if lora is None
             else _merge(graphdef, template, params[0], base_template, params[1]))
    h_BTD, _ = model.hidden(mb["inputs"], attention_mask=mb["segment_ids"] > 0, positions=mb["positions"],
                            segment_ids=mb["segment_ids"])
    return lm_head_cross_entropy(*model.head_operands(h_BTD), mb["targets"], mb["weights"], chunk, dtype)

  def evaluate(params, batch):
    with jax.sharding.use_abstract_mesh(abstract_mesh):
      nll = jnp.sum(jax.lax.map(lambda mb: one(params, mb), batch))
      return nll, jnp.sum(batch["weights"])

  def dpo_one(params, mb):
    model = _merge(graphdef, template, params[0], base_template, params[1])
    _, m = dpo_microbatch_loss(model, mb, train_cfg, None, 1)
    return m

  def dpo_evaluate(params, batch):
    """(sum of the DPO loss over microbatches, microbatches, {metric: sum}): the loop divides by the count."""
    with jax.sharding.use_abstract_mesh(abstract_mesh):
      m = jax.tree.map(jnp.sum, jax.lax.map(lambda mb: dpo_one(params, mb), batch))
      count = jnp.float32(batch["inputs"].shape[0])
      return m["dpo_loss"], count, {k: m[k] for k in ("accuracy", "reward_margin", "chosen_reward", "rejected_reward")}

  sh = state_shardings(model_cfg, make_optimizer(train_cfg)[0], mesh, lora)
  params_sh = sh.params if lora is None else (sh.params, sh.base)
  return jax.jit(dpo_evaluate if is_dpo(train_cfg) else evaluate, in_shardings=(params_sh, batch_sharding(mesh)))


def place_base(model_cfg: MixtralConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh, params: Any = None):
  """LoRA: the frozen base in its shards and the compute dtype, from ``params`` (a pure-dict tree) or
  the random model of seed ``train.seed`` (the same weights a full run of that seed starts from). With
  ``lora.base_quantize`` the base is stored quantized: ``params`` already in that form (as
  ``checkpoint.load(..., quantize=...)`` gives it) are placed as they are, float ones are quantized."""
  lora = _lora(train_cfg)
  base_sh = state_shardings(model_cfg, make_optimizer(train_cfg)[0], mesh, lora).base
  _, _, abs_base = _param_template(model_cfg, lora)
  targets = abs_base.to_pure_dict()
  dt, seed = jnp.dtype(model_cfg.dtype), train_cfg.train.seed

  def build(p):
    if p is None or _needs_quantizing(p, targets):
      model = Mixtral(base_config(model_cfg, None), rngs=nnx.Rngs(seed))
      if p is not None:
        nnx.update(model, nnx.State(p))
      p = nnx.state(_quantized(model, lora), nnx.Param).to_pure_dict()
    return jax.tree.map(lambda a, t: a.astype(t.dtype), p, targets)

  with jax.set_mesh(mesh):
    if params is None:
      return jax.jit(lambda: build(None), out_shardings=base_sh)()
    return jax.jit(build, out_shardings=base_sh)(params)


def _needs_quantizing(p, targets) -> bool:
  """A float tree given for a quantized base (its leaves do not match the quantized template's)."""
  return jax.tree.structure(p) != jax.tree.structure(targets)


def init_state(model_cfg: MixtralConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh,
               params: Any = None) -> TrainState:
  """A fresh train state placed in its shards: random parameters (seed ``train.seed``), or ``params``
  (a pure-dict tree, e.g. from a converted checkpoint), with zeroed optimizer state. With LoRA,
  ``params`` (or the random model) is the frozen base and the adapters start as
  ``mixtral_jax.lora.init_values`` gives them (B = 0: step 0 is the base model)."""
  tx, _ = make_optimizer(train_cfg)
  lora = _lora(train_cfg)
  shardings = state_shardings(model_cfg, tx, mesh, lora)
  seed = train_cfg.train.seed
  rng = jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
  if lora is not None:
    base = place_base(model_cfg, train_cfg, mesh, params)
    adapters = _param_template(model_cfg, lora)[1].to_pure_dict()
    with jax.set_mesh(mesh):
      def build_lora():
        a = lora_lib.init_values(adapters, seed)
        return TrainState(a, tx.init(a), jnp.zeros((), jnp.int32), rng)
      sh = dataclasses.replace(shardings, base=None)
      return dataclasses.replace(jax.jit(build_lora, out_shardings=sh)(), base=base)

  def build(p):
    if p is None:
      p = nnx.state(Mixtral(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()
    return TrainState(p, tx.init(p), jnp.zeros((), jnp.int32), rng)

  with jax.set_mesh(mesh):
    if params is None:
      return jax.jit(lambda: build(None), out_shardings=shardings)()
    return jax.jit(build, out_shardings=shardings)(params)
