"""Evaluation on top of the model (``mixtral_jax.eval``).

  loglikelihood, perplexity, token_logprobs   scoring primitives (``scoring``)
  HarnessLM                                   the lm-evaluation-harness adapter, registered as ``mixtral-jax``
  passkey, perplexity, routing, harness       the ``mixtral-jax eval`` subcommands' engines (``commands``)

``HarnessLM`` is imported on first use: lm-eval is an optional dependency (the ``eval`` extra) and slow
to import.
"""

from .scoring import loglikelihood, perplexity, token_logprobs

__all__ = ["loglikelihood", "perplexity", "token_logprobs", "HarnessLM"]


def __getattr__(name):
  if name == "HarnessLM":
    from .harness import HarnessLM  # noqa: PLC0415
    return HarnessLM
  raise AttributeError(f"module 'mixtral_jax.eval' has no attribute {name!r}")
