"""Training: run configs, the data pipeline, losses, the one jitted train step, checkpoints, the loop.

  config -> data/ -> losses -> step -> checkpointing, metrics -> loop -> commands (``mixtral-jax train``)

``loop.run`` is three phases: set-up (every input check before anything is written or compiled, then
data and the workdir's files), restore-or-init, and the loop itself. ``plan`` compiles the train step
(and the serving programs) ahead of time. ``train`` imports the model, ``checkpoint`` and ``sharding``;
nothing below it imports ``train``.

Public: :func:`load_balancing_loss` (transformers' ``load_balancing_loss_func`` on ``[L, B, T, E]``
router logits) and :func:`router_z_loss`. ``mixtral-jax train`` is ``mixtral_jax.train.commands``.
"""

from .losses import load_balancing_loss, router_z_loss

__all__ = ["load_balancing_loss", "router_z_loss"]
