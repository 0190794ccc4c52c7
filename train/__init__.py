"""Training: run configs, the data pipeline, losses, the one jitted train step, checkpoints, the loop.

Public: :func:`load_balancing_loss` (transformers' ``load_balancing_loss_func`` on ``[L, B, T, E]``
router logits) and :func:`router_z_loss`. ``mixtral-jax train`` is ``mixtral_jax.train.commands``.
"""

from .losses import load_balancing_loss, router_z_loss

__all__ = ["load_balancing_loss", "router_z_loss"]
