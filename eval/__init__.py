"""Evaluation on top of the model: perplexity and log-likelihood scoring."""
