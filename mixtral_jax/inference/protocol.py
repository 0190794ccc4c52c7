"""The OpenAI wire format: request bodies in, response bodies and stream chunks out (no HTTP here).

Requests are read from plain JSON dicts so every problem becomes an :class:`ApiError` with OpenAI's
error body ``{"error": {"message", "type", "param", "code"}}`` and a status: 400 for bad input, 404
for an unknown model. Fields OpenAI defines that change nothing here (``user``, ``n`` = 1,
``logprobs`` false, ...) are accepted; ones that would change the answer and are not implemented
(``n`` > 1, ``tool_choice`` "required") are refused by name rather than ignored. ``logprobs`` /
``top_logprobs`` are :mod:`mixtral_jax.inference.logprobs`'s.

Sampling fields: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (OpenAI's default
1.0; 0 is greedy), ``top_p``, ``top_k`` (an extension, as vLLM has), ``stop`` (a string or up to 4),
``seed`` (0 <= seed < 2**31; without one each request draws its own).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import Any

from mixtral_jax.inference.logprobs import LogprobsError, requested_top
from mixtral_jax.text_input import first_undecodable

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls"}


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.type = type_ or {400: "invalid_request_error", 404: "invalid_request_error",
                          429: "rate_limit_error"}.get(status, "server_error")

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Params:
  """What a request asks of the engine, validated."""
  max_tokens: int | None
  temperature: float
  top_p: float
  top_k: int
  stop: tuple[str, ...]
  seed: int
  stream: bool
  include_usage: bool
  top_logprobs: int | None = None  # logprobs asked for: alternatives per token (0: the chosen one's only)
  response_format: Any = None  # as sent; compiled by mixtral_jax.inference.grammar


def parse_json(raw: bytes) -> dict:
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
  return body


def check_model(body: dict, served: str, adapters: tuple[str, ...] = ()) -> str | None:
  """The served adapter a request's ``model`` names, None for the base ``served``; 404 (OpenAI's
  ``model_not_found``) for any other name."""
  name = body.get("model")
  if not isinstance(name, str) or not name:
    raise ApiError(400, f"'model' is required: this server serves {served!r}", param="model")
  if name in adapters:
    return name
  if name != served:
    names = ", ".join(repr(n) for n in (served, *adapters))
    raise ApiError(404, f"the model {name!r} does not exist; this server serves {names} (GET /v1/models)",
                   param="model", code="model_not_found")
  return None


def _number(body, key, default, lo, hi, kind=float):
  value = body.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
    raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r:.40}", param=key)
  if not lo <= value <= hi:
    raise ApiError(400, f"'{key}' must be in [{lo}, {hi}], got {value}", param=key)
  return kind(value)


def parse_params(body: dict, default_max_tokens: int | None, route: str = "completions") -> Params:
  """The sampling and streaming fields shared by both completion routes (``route``: "chat" or
  "completions", whose ``logprobs`` fields differ, see :mod:`mixtral_jax.inference.logprobs`)."""
  if _number(body, "n", 1, 1, 1 << 30, int) != 1:
    raise ApiError(400, "'n' > 1 is not supported; send n requests (they are batched together)", param="n")
  try:
    top_logprobs = requested_top(body, route)
  except LogprobsError as e:
    raise ApiError(400, str(e), param=e.param) from None
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, 1 << 30, int)
  top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
  if top_p <= 0:
    raise ApiError(400, "'top_p' must be in (0, 1]", param="top_p")
  stop = body.get("stop")
  if stop is None:
    stop = ()
  elif isinstance(stop, str):
    stop = (stop,)
  elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
    stop = tuple(stop)
  else:
    raise ApiError(400, f"'stop' must be a string or a list of up to 4 strings, got {stop!r:.80}", param="stop")
  if any(not s for s in stop):
    raise ApiError(400, "'stop' strings must be non-empty", param="stop")
  seed = body.get("seed")
  seed = secrets.randbelow(1 << 31) if seed is None else _number(body, "seed", 0, 0, (1 << 31) - 1, int)
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise ApiError(400, f"'stream' must be true or false, got {stream!r:.40}", param="stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict):
    raise ApiError(400, "'stream_options' must be an object", param="stream_options")
  return Params(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=top_p,
                top_k=_top_k(body), stop=stop, seed=seed, stream=stream,
                include_usage=bool(options.get("include_usage", False)), top_logprobs=top_logprobs,
                response_format=body.get("response_format"))


def _top_k(body: dict) -> int:
  """``top_k``: 0 or absent for all tokens, else >= 1 (vLLM's -1 for "off" is refused by name, not guessed)."""
  top_k = _number(body, "top_k", 0, -(1 << 30), 1 << 30, int)
  if top_k < 0:
    raise ApiError(400, f"'top_k' must be >= 1, or 0 / absent for all tokens, got {top_k}", param="top_k")
  return top_k


def check_text(value, param: str) -> None:
  """A 400 naming ``param`` when a string in ``value`` cannot be tokenized (a lone surrogate such as
  JSON's "\\ud800"; see ``mixtral_jax.text_input``)."""
  problem = first_undecodable(value)
  if problem:
    raise ApiError(400, f"'{param}' is not valid Unicode text: {problem}; send well-formed UTF-8",
                   param=param, code="invalid_text")


def parse_chat(body: dict, version: str) -> tuple[list[dict], list[dict] | None]:
  """(messages, tools or None) of a chat request; tools are dropped for ``tool_choice`` "none"."""
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
  tools = body.get("tools")
  choice = body.get("tool_choice", "auto")
  if choice not in ("auto", "none", None):
    raise ApiError(400, f"tool_choice {choice!r:.80} is not supported; use 'auto' or 'none'", param="tool_choice")
  if tools is not None and version != "v3":
    raise ApiError(400, f"this model uses the {version} chat format, which has no tool calling", param="tools")
  # OpenAI clients send assistant turns with "tool_calls": null and tool turns with extra keys.
  cleaned = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
  check_text(cleaned, "messages")
  check_text(tools, "tools")
  return cleaned, (tools or None) if choice != "none" else None


def parse_prompt(body: dict, tokenizer) -> list[int]:
  """A completions prompt: a string, a list of token ids, or a list holding one of those."""
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]
  if isinstance(prompt, str):
    check_text(prompt, "prompt")
    return tokenizer.encode(prompt, bos=True)
  if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
    if bad:
      raise ApiError(400, f"prompt token ids outside the vocabulary [0, {tokenizer.vocab_size}): {bad[:5]}",
                     param="prompt")
    return list(prompt)
  raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                 param="prompt")


def check_length(n: int, max_tokens: int | None, context: int, prompt_param: str = "messages") -> int:
  """max_tokens (default: the rest of the context), or a 400 naming the prompt length and the context
  (and ``prompt_param``: "messages" for chat, "prompt" for completions); the prompt is not echoed."""
  if n >= context:
    raise ApiError(400, f"the prompt has {n} tokens but the context is {context} tokens (--max-context); "
                   "shorten the prompt", param=prompt_param, code="context_length_exceeded")
  if max_tokens is None:
    return context - n
  if n + max_tokens > context:
    raise ApiError(400, f"the prompt has {n} tokens and max_tokens is {max_tokens}, {n + max_tokens} in all, "
                   f"but the context is {context} tokens; ask for at most {context - n}",
                   param="max_tokens", code="context_length_exceeded")
  return max_tokens


# ------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
  return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def tool_calls_json(calls: list[dict]) -> list[dict]:
  """``parse_tool_calls`` output as OpenAI's ``tool_calls`` (arguments as a JSON string)."""
  return [{"id": c["id"], "type": "function",
           "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]


def chat_response(rid, model, text, calls, finish, use, logprobs=None) -> dict:
  message: dict[str, Any] = {"role": "assistant", "content": None if calls else text}
  if calls:
    message["tool_calls"] = tool_calls_json(calls)
  return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}], "usage": use}


def completion_response(rid, model, text, finish, use, logprobs=None) -> dict:
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}], "usage": use}


def chat_chunk(rid, model, delta: dict, finish=None, use=None, logprobs=None) -> dict:
  chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
  if use is not None:
    chunk["usage"] = use
  return chunk


def completion_chunk(rid, model, text: str, finish=None, use=None, logprobs=None) -> dict:
  chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}
  if use is not None:
    chunk["usage"] = use
  return chunk


def sse(data: dict | str) -> str:
  return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
