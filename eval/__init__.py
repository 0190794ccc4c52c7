"""Evaluation on top of the model: log-likelihood scoring and perplexity (``mixtral_jax.eval``)."""

from .scoring import loglikelihood, perplexity, token_logprobs

__all__ = ["loglikelihood", "perplexity", "token_logprobs"]
