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
