"""Generation beyond the model: int8 weights (``quantize``), the engine that ``generate`` and the server
share (``engine``: the continuous-batching loop; ``programs``: its compiled prefill and decode;
``row``: per-sequence text, stop strings and streaming; ``placement``: mesh and CPU weight views), the
paged KV cache (``pages``: pool, page tables, prefix cache, on the host; ``memory``: its default size;
``paged_batch``: a step's arrays; ``paged_programs``: its compiled step; ``paged_runner``: what the
engine calls), structured
output (``grammar``, llguidance) and ``logprobs`` (with ``pieces``: each token's bytes), and the
OpenAI-compatible HTTP server (``server``, ``protocol``, ``commands``; ``launch`` starts one as a child
process). Sampling is
``mixtral_jax.sampling``.

Nothing is imported here: the model imports ``quantize`` (a leaf module), and the server's FastAPI
stack loads only for ``mixtral-jax serve``.
"""
