"""Inference beyond the batch ``generate`` call: int8 weights (``quantize``), per-row sampling
(``row_sampling``), the continuous-batching engine (``engine``) and the OpenAI-compatible HTTP server
(``server``, ``protocol``, ``commands``).

Nothing is imported here: the model imports ``quantize`` (a leaf module), and the server's FastAPI
stack loads only for ``mixtral-jax serve``.
"""
