"""Direct preference optimisation: the losses, the rewards, and per-sequence log-probabilities.

Each pair is a prompt x with a chosen answer y_w and a rejected answer y_l. With the policy pi (the base
plus LoRA adapters) and the reference pi_ref (the same forward with the adapters switched off, so no
second model is held), per pair:

  h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

  sigmoid (DPO, Rafailov et al. 2023, eq. 7; label smoothing eps is the conservative cDPO of
           Mitchell 2023, as TRL's ``label_smoothing``):
      loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
  ipo     (Azar et al. 2023, eq. 17, tau = beta):
      loss = (h - 1 / (2 * beta))^2
      TRL feeds IPO per-token *averaged* log-probabilities; :func:`sequence_logprobs` gives either.

  rewards (the implicit reward of DPO, logged as TRL does):
      chosen_reward   = beta * (log pi(y_w|x) - log pi_ref(y_w|x))
      rejected_reward = beta * (log pi(y_l|x) - log pi_ref(y_l|x))
      margin          = chosen_reward - rejected_reward
      accuracy        = [chosen_reward > rejected_reward]   (a tie counts as wrong)

The losses and metrics are means over the pairs whose ``pair_mask`` is 1 (batches padded with empty
pairs stay exact). The reference log-probs are passed through ``stop_gradient``: no gradient reaches the
frozen base through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array, weights_BT: jax.Array,
                      average: bool = False) -> jax.Array:
  """log p(answer) per row, float32 ``[B]``: the sum (or, with ``average``, the mean) over positions t
  with ``weights_BT[t] > 0`` of ``log softmax(logits[t - 1])[tokens[t]]`` - the next-token convention of
  a causal LM, so position 0 is never scored. ``weights_BT`` marks the answer tokens (and their EOS)."""
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  target_BT = tokens_BT[:, 1:]
  logp_BT = jnp.take_along_axis(logp_BTV, target_BT[..., None], axis=-1)[..., 0]
  w_BT = (weights_BT[:, 1:] > 0).astype(jnp.float32)
  total_B = jnp.sum(logp_BT * w_BT, axis=-1)
  if not average:
    return total_B
  return total_B / jnp.maximum(jnp.sum(w_BT, axis=-1), 1.0)


def check_options(beta: float, label_smoothing: float, loss_type: str) -> None:
  """Raises, naming the setting, for options the losses do not define."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"dpo.loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
  if not beta > 0:
    raise ValueError(f"dpo.beta={beta} must be > 0 (typical 0.1)")
  if not 0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo.label_smoothing={label_smoothing} must be in [0, 0.5) (0 is plain DPO)")
  if loss_type == "ipo" and label_smoothing:
    raise ValueError("dpo.label_smoothing applies to the sigmoid loss only; set it to 0 with loss_type='ipo'")


def dpo_loss(policy_chosen_B: jax.Array, policy_rejected_B: jax.Array, ref_chosen_B: jax.Array,
             ref_rejected_B: jax.Array, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", pair_mask_B: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """(mean loss, metrics) from per-sequence log-probs ``[B]``: see the module docstring for the formulas.
  Metrics: ``chosen_reward``, ``rejected_reward``, ``reward_margin``, ``accuracy`` (means over pairs)."""
  check_options(beta, label_smoothing, loss_type)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref_chosen_B = jax.lax.stop_gradient(f32(ref_chosen_B))
  ref_rejected_B = jax.lax.stop_gradient(f32(ref_rejected_B))
  chosen_ratio_B = f32(policy_chosen_B) - ref_chosen_B
  rejected_ratio_B = f32(policy_rejected_B) - ref_rejected_B
  h_B = chosen_ratio_B - rejected_ratio_B
  if loss_type == "sigmoid":
    losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
  else:
    losses_B = (h_B - 1.0 / (2.0 * beta)) ** 2
  mask_B = jnp.ones_like(h_B) if pair_mask_B is None else f32(pair_mask_B)
  mean = lambda x: jnp.sum(x * mask_B) / jnp.maximum(jnp.sum(mask_B), 1.0)  # noqa: E731
  chosen_reward_B = beta * jax.lax.stop_gradient(chosen_ratio_B)
  rejected_reward_B = beta * jax.lax.stop_gradient(rejected_ratio_B)
  metrics = {
      "chosen_reward": mean(chosen_reward_B),
      "rejected_reward": mean(rejected_reward_B),
      "reward_margin": mean(chosen_reward_B - rejected_reward_B),
      "accuracy": mean((chosen_reward_B > rejected_reward_B).astype(jnp.float32)),
  }
  return mean(losses_B), metrics


def split_pairs(x_2B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) halves of a batch laid out as all chosen rows, then all rejected rows (the
  layout of :func:`mixtral_jax.train.data.preference.pair_batch`, so one forward scores both)."""
  b = x_2B.shape[0] // 2
  return x_2B[:b], x_2B[b:]


# ---------------------------------------------------------------------------- on the model


def adapters_off(model):
  """The reference model: ``model`` with every LoRA adapter factor zeroed, sharing its base weights.
  With B = 0 (and A = 0) each adapter adds exactly 0, so this is the frozen base - no second model is
  held, and under ``jit`` the zeros are constants. Refuses a model without adapters (DPO needs LoRA)."""
  from flax import nnx  # noqa: PLC0415

  from mixtral_jax.lora import LoRAParam  # noqa: PLC0415
  graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
  if not jax.tree.leaves(adapters):
    raise ValueError("DPO takes its reference from the base with the LoRA adapters off, and this model has "
                     "none: set lora.rank (e.g. --set lora.rank=16)")
  return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, adapters), rest)


def answer_logprobs(model, mb: dict, chunk: int, average: bool = False, lora_key=None) -> tuple[jax.Array, dict]:
  """(log p(answer) per row ``[2B]``, the forward's aux) for a batch of :func:`pair_batch` rows. Uses the
  chunked LM-head cross-entropy one row at a time (``vmap``), so the ``[2B, T, V]`` logits are never
  held: ``-sum_t w_t * nll_t`` of a row is the log-probability of its weighted targets."""
  from .losses import lm_head_cross_entropy  # noqa: PLC0415
  dtype = jnp.dtype(model.cfg.dtype)
  blocks_key, head_key = (None, None) if lora_key is None else jax.random.split(lora_key)
  valid_BT = mb["segment_ids"] > 0
  h_BTD, aux = model.hidden(mb["inputs"], attention_mask=valid_BT, positions=mb["positions"],
                            segment_ids=mb["segment_ids"], lora_key=blocks_key)
  h_BTD, w_DV = model.head_operands(h_BTD, head_key)
  row = lambda h, w, t, wt: lm_head_cross_entropy(h[None], w, t[None], wt[None], chunk, dtype)  # noqa: E731
  nll_B = jax.vmap(row, in_axes=(0, None, 0, 0))(h_BTD, w_DV, mb["targets"], mb["weights"])
  logp_B = -nll_B
  if average:
    logp_B = logp_B / jnp.maximum(jnp.sum(mb["weights"] > 0, axis=-1), 1)
  return logp_B, aux


def reference_logprobs(model, mb: dict, chunk: int, average: bool = False) -> jax.Array:
  """log pi_ref(answer) per row ``[2B]``: :func:`answer_logprobs` of ``model`` with the adapters off, no
  gradient. Call it outside the differentiated function (the train step does): inside, JAX's partial
  evaluation of the policy's layer scan then saved a copy of the stacked base weights for the backward
  (XLA:GPU, 8x7B nf4, 4 pairs x 4096: 21.9 GiB more temporaries)."""
  ref_B, _ = answer_logprobs(adapters_off(model), mb, chunk, average)
  return jax.lax.stop_gradient(ref_B)


def microbatch_loss(model, mb: dict, *, beta: float, label_smoothing: float, loss_type: str, chunk: int,
                    num_microbatches: int, lora_key=None, ref_B=None) -> tuple[jax.Array, dict]:
  """This microbatch's share of the DPO step loss and its metrics: the policy forward (adapters on, with
  dropout) and the reference log-probs ``ref_B`` (:func:`reference_logprobs`, computed here when None)
  over the same ``[2B, T]`` rows, then :func:`dpo_loss` (IPO on per-token averaged log-probs, as TRL),
  plus the router load-balancing loss of the policy forward times the config's coefficient, as the LM
  step adds it."""
  from .losses import load_balancing_loss  # noqa: PLC0415
  average = loss_type == "ipo"
  policy_B, aux = answer_logprobs(model, mb, chunk, average, lora_key)
  if ref_B is None:
    ref_B = reference_logprobs(model, mb, chunk, average)
  pc, pr = split_pairs(policy_B)
  rc, rr = split_pairs(jax.lax.stop_gradient(ref_B))
  w_chosen, w_rejected = split_pairs(jnp.sum(mb["weights"], axis=-1))
  pair_mask = ((w_chosen > 0) & (w_rejected > 0)).astype(jnp.float32)
  loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                           pair_mask_B=pair_mask)
  cfg = model.cfg
  lb = load_balancing_loss(aux["router_logits"], cfg.num_experts_per_tok, mb["segment_ids"] > 0)
  total = (loss + cfg.router_aux_loss_coef * lb) / num_microbatches
  metrics = {k: v / num_microbatches for k, v in {**metrics, "dpo_loss": loss, "aux_loss": lb}.items()}
  return total, metrics
