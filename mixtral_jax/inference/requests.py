"""What the engine serves and counts: a :class:`Request` (prompt, limits, sampling settings, callbacks,
and the row that follows its tokens), the engine's :class:`Metrics`, and :class:`QueueFull`."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

from mixtral_jax.inference.row import Row


class QueueFull(Exception):
  """The waiting queue is at its limit; the server answers 429."""


@dataclasses.dataclass
class Request:
  """One generation request. ``on_token(token, text_delta)`` and ``on_done(finish_reason, error)`` are
  called from the engine thread. ``finish_reason``: "eos", "stop", "length" or "cancelled"."""
  prompt: list[int]
  max_tokens: int
  on_token: Callable[[int | None, str], None]
  on_done: Callable[[str, "str | None"], None]
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  index: int = 0  # the sampling key's index (generate: the prompt's index in its call)
  stop: tuple[str, ...] = ()
  eos: frozenset = frozenset()
  id: int = dataclasses.field(default_factory=itertools.count().__next__)
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  first_token_at: float | None = None
  cancelled: bool = False
  row: Row | None = None
  top_logprobs: int | None = None  # logprobs wanted (paged cache only): alternatives per token
  grammar: str | None = None  # structured output (paged cache only): an llguidance grammar
  matcher: object = None  # its matcher, following the sampled tokens (made at submit)
  logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprobs of each token in row.tokens
  adapter: str | None = None  # a served adapter's name (paged cache only), None for the base

  def cancel(self) -> None:
    """Safe from any thread: the engine frees the request's row (or queue place) at its next step."""
    self.cancelled = True


@dataclasses.dataclass
class Metrics:
  requests: int = 0  # finished, any reason
  rejected: int = 0  # 429
  prompt_tokens: int = 0
  generated_tokens: int = 0
  decode_steps: int = 0
  occupied_row_steps: int = 0  # sum over decode steps of decoding rows
  ttft: list = dataclasses.field(default_factory=list)  # seconds, one per request that got a token
