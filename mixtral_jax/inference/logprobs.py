"""logprobs in OpenAI's format: what a request asks for, the numbers on device, the JSON out.

Request fields:
  * chat: ``logprobs: true`` and ``top_logprobs: k`` (0 <= k <= MAX_TOP_LOGPROBS; ``top_logprobs``
    without ``logprobs: true`` is an error, as in OpenAI's API);
  * completions: ``logprobs: k`` (an integer, 0 <= k <= MAX_TOP_LOGPROBS; null/false is off).
Out of range -> :class:`LogprobsError` (the server answers 400 naming the field).

Numbers (:func:`token_logprobs`, inside the jitted decode step): ``log_softmax`` of the model's raw
logits in float32 (before temperature, top-k/top-p and grammar masks, as vLLM reports by default and
as transformers' ``log_softmax(logits)`` gives), the sampled token's value and the ``k`` largest with
their ids, ties to the lower id. ``k`` is static: the engine compiles one width (MAX_TOP_LOGPROBS) and
each request keeps the first ``k`` it asked for.

JSON (per generated token, from the vocabulary's bytes, :mod:`mixtral_jax.inference.pieces`; a
byte-fallback token's string is U+FFFD when its byte is half a character, its ``bytes`` exact; control
tokens by name):
  * chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``;
  * completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``, the
    offsets counted in characters of the token strings from the start of the completion.
A stream chunk carries the entries of the tokens whose text it brings (the same functions over a slice,
with the completion's running text offset).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.inference.pieces import SPECIAL_MARK

# OpenAI's limit for chat top_logprobs (20); vLLM uses the same default for both routes.
MAX_TOP_LOGPROBS = 20


class LogprobsError(ValueError):
  """A bad logprobs request; ``param`` names the field."""

  def __init__(self, message: str, param: str):
    super().__init__(message)
    self.param = param


def requested_top(body: dict, route: str) -> int | None:
  """How many top alternatives a request wants per token (0: only the chosen token's), None for none.
  ``route`` is "chat" or "completions"."""
  if route == "chat":
    on, top = body.get("logprobs"), body.get("top_logprobs")
    if on not in (None, True, False):
      raise LogprobsError(f"'logprobs' must be a boolean on /v1/chat/completions, got {on!r:.40}", "logprobs")
    if top is not None and not on:
      raise LogprobsError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if not on:
      return None
    return _count(top, "top_logprobs")
  if route == "completions":
    k = body.get("logprobs")
    if k is None or k is False:
      return None
    return _count(k, "logprobs")
  raise ValueError(f"route must be 'chat' or 'completions', got {route!r}")


def _count(k: Any, param: str) -> int:
  if k is None:
    return 0
  if isinstance(k, bool) or not isinstance(k, int):
    raise LogprobsError(f"'{param}' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r:.40}", param)
  if not 0 <= k <= MAX_TOP_LOGPROBS:
    raise LogprobsError(f"'{param}' must be in [0, {MAX_TOP_LOGPROBS}], got {k}", param)
  return k


def token_logprobs(logits_BV: jax.Array, tokens_B: jax.Array, k: int = MAX_TOP_LOGPROBS):
  """(chosen ``[B]``, top ids ``[B, k]`` int32, top logprobs ``[B, k]``), float32 log-softmax of the
  raw logits."""
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  chosen_B = jnp.take_along_axis(logp_BV, tokens_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
  top_BK, ids_BK = jax.lax.top_k(logp_BV, k)
  return chosen_B, ids_BK.astype(jnp.int32), top_BK


@dataclasses.dataclass
class TokenLogprobs:
  """One generated token's numbers on the host: its id and logprob, and the top ``k`` alternatives."""
  token: int
  logprob: float
  top_ids: np.ndarray  # [k]
  top_logprobs: np.ndarray  # [k]


def rows_to_host(chosen_B, ids_BK, top_BK, tokens_B, k_B) -> list[TokenLogprobs | None]:
  """Per row b, its token's :class:`TokenLogprobs` cut to the ``k_B[b]`` it asked for (None: none asked)."""
  chosen, ids, top = np.asarray(chosen_B), np.asarray(ids_BK), np.asarray(top_BK)
  return [None if k is None else TokenLogprobs(int(t), float(c), i[:k], v[:k])
          for t, c, i, v, k in zip(np.asarray(tokens_B), chosen, ids, top, k_B)]


def _text(vocab: tuple[bytes, ...], token: int) -> tuple[str, list[int]]:
  raw = vocab[token]
  if raw.startswith(SPECIAL_MARK):  # control tokens by name ("</s>"), as OpenAI shows its specials
    raw = raw[len(SPECIAL_MARK):]
  return raw.decode("utf-8", "replace"), list(raw)


def chat_content(entries: list[TokenLogprobs], vocab: tuple[bytes, ...]) -> list[dict]:
  """OpenAI chat ``logprobs.content``: one entry per generated token."""
  out = []
  for e in entries:
    token, raw = _text(vocab, e.token)
    top = []
    for i, lp in zip(e.top_ids, e.top_logprobs):
      t, b = _text(vocab, int(i))
      top.append({"token": t, "logprob": float(lp), "bytes": b})
    out.append({"token": token, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
  return out


def chat_logprobs(entries: list[TokenLogprobs], vocab: tuple[bytes, ...]) -> dict:
  """The chat choice's (or chunk's) ``logprobs`` object."""
  return {"content": chat_content(entries, vocab), "refusal": None}


def completion_logprobs(entries: list[TokenLogprobs], vocab: tuple[bytes, ...], offset: int = 0) -> dict:
  """The completions choice's (or chunk's) ``logprobs``; ``offset``: characters of completion text
  before these tokens (the running offset of a stream)."""
  tokens, offsets = [], []
  for e in entries:
    offsets.append(offset)
    token = _text(vocab, e.token)[0]
    tokens.append(token)
    offset += len(token)
  top = []
  for e in entries:
    alts: dict[str, float] = {}
    for i, lp in zip(e.top_ids, e.top_logprobs):
      alts.setdefault(_text(vocab, int(i))[0], float(lp))  # two ids may share a text: keep the likelier
    top.append(alts)
  return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
          "text_offset": offsets}


def text_length(entries: list[TokenLogprobs], vocab: tuple[bytes, ...]) -> int:
  """Characters the tokens' strings take (to advance a stream's running offset)."""
  return sum(len(_text(vocab, e.token)[0]) for e in entries)
