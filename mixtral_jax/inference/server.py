"""The OpenAI-compatible HTTP server: FastAPI routes over one :class:`~mixtral_jax.inference.engine.Engine`.

  POST /v1/chat/completions   messages through ``encode_chat`` (Instruct v1 or v3); v3 takes ``tools``
                              and answers ``tool_calls`` (parsed by ``parse_tool_calls``) when the
                              reply starts with the ``[TOOL_CALLS]`` token
  POST /v1/completions        a text prompt (BOS added) or token ids
  GET  /v1/models             the served base model and its adapters (``serve --adapter NAME=PATH``); a
                              request's ``model`` picks one, and the answer names it
  GET  /health                200 once the model is loaded and compiled
  GET  /metrics               Prometheus text: requests, tokens, queue depth, rows busy, batch
                              occupancy, time to first token

The routes are the methods of :class:`Server` (``build_app`` returns its app). Each request becomes
an engine request whose callbacks (on the engine thread) hand tokens to an
``asyncio.Queue`` on the server's event loop. ``stream: true`` answers server-sent events in OpenAI's
chunk format (the last chunk carries ``finish_reason`` and ``usage``), then ``data: [DONE]``. A client
that goes away cancels its request, which frees its batch row at the engine's next step: for a stream
Starlette notices the disconnect and cancels the generator; otherwise a task waits on the ASGI
``http.disconnect`` message. A full queue answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from mixtral_jax.chat import TOOL_CALLS, encode_chat, parse_tool_calls
from mixtral_jax.inference import protocol as P
from mixtral_jax.inference.engine import Engine, QueueFull, Request
from mixtral_jax.inference.logprobs import chat_logprobs, completion_logprobs, text_length
from mixtral_jax.inference.pieces import vocabulary_bytes

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def build_app(engine: Engine, tokenizer, model_name: str, chat_version: str) -> FastAPI:
  """The FastAPI app of a :class:`Server` over ``engine``."""
  return Server(engine, tokenizer, model_name, chat_version).app


class Server:
  """The HTTP routes (methods) over one engine, one tokenizer, one served model name and chat format."""

  def __init__(self, engine: Engine, tokenizer, model_name: str, chat_version: str):
    self.engine, self.tokenizer, self.model_name, self.chat_version = engine, tokenizer, model_name, chat_version
    self.tool_calls_id = tokenizer.special_id(TOOL_CALLS) if chat_version == "v3" else None
    self.created = int(time.time())
    app = FastAPI(title="mixtral-jax", docs_url=None, redoc_url=None)
    app.add_exception_handler(P.ApiError, self.api_error)
    app.get("/health")(self.health)
    app.get("/v1/models")(self.models)
    app.get("/metrics")(self.metrics)
    app.post("/v1/chat/completions")(self.chat)
    app.post("/v1/completions")(self.completions)
    self.app = app

  # ------------------------------------------------------------------------------ routes

  async def api_error(self, _request, e: P.ApiError):
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)

  async def health(self):
    return {"status": "ok", "model": self.model_name}

  async def models(self):
    card = lambda name, **extra: {"id": name, "object": "model", "created": self.created,  # noqa: E731
                                  "owned_by": "mixtral-jax", "max_model_len": self.engine.max_context, **extra}
    adapters = [card(a, parent=self.model_name, root=self.model_name) for a in self.engine.adapters]
    return {"object": "list", "data": [card(self.model_name)] + adapters}

  async def metrics(self):
    return PlainTextResponse(prometheus(self.engine), media_type="text/plain; version=0.0.4")

  async def chat(self, http: HttpRequest):
    body = P.parse_json(await http.body())
    adapter = P.check_model(body, self.model_name, self.engine.adapters)
    messages, tools = P.parse_chat(body, self.chat_version)
    params = P.parse_params(body, None, "chat")
    try:
      prompt = encode_chat(messages, tools, version=self.chat_version)
    except ValueError as e:
      raise P.ApiError(400, str(e), param="messages") from None
    detect = self.tool_calls_id if tools else None
    return await self._generate(http, prompt, params, "chat", detect, adapter)

  async def completions(self, http: HttpRequest):
    body = P.parse_json(await http.body())
    adapter = P.check_model(body, self.model_name, self.engine.adapters)
    if body.get("echo") or body.get("suffix"):
      raise P.ApiError(400, "'echo' and 'suffix' are not supported by this server")
    params = P.parse_params(body, 16)  # OpenAI's default for completions
    return await self._generate(http, P.parse_prompt(body, self.tokenizer), params, "completion", None, adapter)

  # ------------------------------------------------------------------------------ one request

  async def _generate(self, http, prompt, params, kind, tool_calls_id, adapter=None):
    """Submits the request to the engine (under ``adapter``, a served adapter's name, or the base); its
    tokens arrive on ``events`` (this event loop)."""
    max_tokens = P.check_length(len(prompt), params.max_tokens, self.engine.max_context,
                                "messages" if kind == "chat" else "prompt")
    if params.top_logprobs is not None and self.engine.runner is None:
      raise P.ApiError(400, "logprobs are not served with --fixed-rows (they need the paged KV cache): restart the "
                       "server without --fixed-rows", param="logprobs")
    grammar = self._grammar(params.response_format)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    put = lambda *e: loop.call_soon_threadsafe(events.put_nowait, e)  # noqa: E731
    req = Request(prompt, max_tokens, on_token=lambda t, d: put("token", t, d), on_done=lambda r, e: put("done", r, e),
                  temperature=params.temperature, top_k=max(params.top_k, 0), top_p=params.top_p, seed=params.seed,
                  stop=params.stop, eos=frozenset([self.tokenizer.eos_id]), top_logprobs=params.top_logprobs,
                  grammar=grammar, adapter=adapter)
    try:
      self.engine.submit(req)
    except QueueFull as e:
      raise P.ApiError(429, str(e), code="queue_full") from None
    except ValueError as e:
      raise P.ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    rid = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
    if params.stream:
      return StreamingResponse(self._stream(req, events, rid, kind, tool_calls_id), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    return await self._wait(http, req, events, rid, kind, tool_calls_id)

  def _grammar(self, fmt) -> str | None:
    """The grammar of a request's ``response_format`` (None for text); 400 with the engine's reason."""
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
      return None
    if self.engine.runner is None:
      raise P.ApiError(400, "response_format is not served with --fixed-rows (it needs the paged KV cache): restart "
                       "the server without --fixed-rows", param="response_format")
    from mixtral_jax.inference.grammar import GrammarError  # noqa: PLC0415 - llguidance only when used
    try:
      return self.engine.structured().compile(fmt)
    except GrammarError as e:
      raise P.ApiError(400, str(e), param="response_format") from None

  def _result(self, req: Request, reason: str, tool_calls_id):
    """(text, tool calls or None, OpenAI finish reason, usage) of a finished request."""
    tokens = req.row.tokens
    use = P.usage(len(req.prompt), len(tokens) + (reason == "eos"))
    if tool_calls_id is not None and tokens and tokens[0] == tool_calls_id:
      try:
        return None, parse_tool_calls(self.tokenizer.decode(tokens[1:])), "tool_calls", use
      except ValueError:
        pass  # not a well-formed call: return the text as it is
    return req.row.text, None, P.FINISH[reason], use

  async def _wait(self, http, req, events, rid, kind, tool_calls_id):
    """The whole answer at once; a client that disconnects first cancels the request (499)."""
    gone = asyncio.ensure_future(_disconnected(http))
    try:
      while True:
        get = asyncio.ensure_future(events.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
          get.cancel()
          req.cancel()
          return JSONResponse({}, status_code=499)
        event = get.result()
        if event[0] == "done":
          break
    finally:
      gone.cancel()
    _, reason, error = event
    if reason == "error":
      raise P.ApiError(500, f"generation failed: {error}")
    text, calls, finish, use = self._result(req, reason, tool_calls_id)
    lp = self._logprobs(req, 0, len(req.logprobs), kind, 0)
    if kind == "chat":
      return P.chat_response(rid, self._name(req), text, calls, finish, use, lp)
    return P.completion_response(rid, self._name(req), text, finish, use, lp)

  def _name(self, req: Request) -> str:
    """The model a request asked for: its adapter's name, or the base's."""
    return req.adapter or self.model_name

  def _logprobs(self, req: Request, lo: int, hi: int, kind: str, offset: int):
    """OpenAI's ``logprobs`` of the request's tokens lo..hi (None when the request asked for none);
    ``offset``: completion characters before token lo (streams)."""
    if req.top_logprobs is None:
      return None
    vocab = vocabulary_bytes(self.tokenizer.path)
    entries = req.logprobs[lo:hi]
    return chat_logprobs(entries, vocab) if kind == "chat" else completion_logprobs(entries, vocab, offset)

  async def _stream(self, req, events, rid, kind, tool_calls_id):
    """Server-sent events: the text deltas as they come (a tool call held back until complete), then
    the closing chunks. A generator Starlette cancels (the client went away) cancels the request."""
    done = False
    try:
      if kind == "chat":
        yield P.sse(P.chat_chunk(rid, self._name(req), {"role": "assistant", "content": ""}))
      held, seen = False, 0  # a tool call is held back until it is complete
      sent, offset = 0, 0  # logprobs entries already streamed, and their completion characters
      while True:
        event = await events.get()
        if event[0] == "done":
          done = True
          break
        _, token, delta = event
        seen += token is not None
        if tool_calls_id is not None and token == tool_calls_id and seen == 1:
          held = True
        if delta and not held:
          n = len(req.logprobs)
          lp = self._logprobs(req, sent, n, kind, offset)
          if req.top_logprobs is not None:
            offset += text_length(req.logprobs[sent:n], vocabulary_bytes(self.tokenizer.path))
          sent = n
          yield P.sse(P.chat_chunk(rid, self._name(req), {"content": delta}, logprobs=lp) if kind == "chat"
                      else P.completion_chunk(rid, self._name(req), delta, logprobs=lp))
      for chunk in self._stream_end(req, event, rid, kind, tool_calls_id, held, (sent, offset)):
        yield chunk
    finally:
      if not done:
        req.cancel()  # the client went away (Starlette cancelled this generator)

  def _stream_end(self, req, event, rid, kind, tool_calls_id, held, logprobs_sent=(0, 0)) -> list[str]:
    """The closing events of a stream: an error, or the tool calls / held text, the finish reason and
    usage (with the logprobs of tokens not streamed yet), and ``[DONE]``."""
    _, reason, error = event
    if reason == "error":
      return [P.sse({"error": {"message": f"generation failed: {error}", "type": "server_error"}})]
    text, calls, finish, use = self._result(req, reason, tool_calls_id)
    lp = self._logprobs(req, logprobs_sent[0], len(req.logprobs), kind, logprobs_sent[1])
    out = []
    if kind == "chat":
      if calls:
        delta = {"tool_calls": [dict(c, index=i) for i, c in enumerate(P.tool_calls_json(calls))]}
        out.append(P.sse(P.chat_chunk(rid, self._name(req), delta)))
      elif held and text:
        out.append(P.sse(P.chat_chunk(rid, self._name(req), {"content": text})))
      out.append(P.sse(P.chat_chunk(rid, self._name(req), {}, finish, use, lp)))
    else:
      out.append(P.sse(P.completion_chunk(rid, self._name(req), "", finish, use, lp)))
    return out + [P.sse("[DONE]")]


async def _disconnected(http: HttpRequest) -> None:
  """Returns when the client disconnects (the body is read, so the next ASGI message is that)."""
  while True:
    message = await http.receive()
    if message["type"] == "http.disconnect":
      return


def prometheus(engine: Engine) -> str:
  """The engine's counters and gauges in the Prometheus text exposition format."""
  m = engine.metrics
  occupancy = m.occupied_row_steps / (m.decode_steps * engine.B) if m.decode_steps else 0.0
  lines = []

  def metric(name, kind, help_, value):
    lines.extend([f"# HELP mixtral_jax_{name} {help_}", f"# TYPE mixtral_jax_{name} {kind}",
                  f"mixtral_jax_{name} {value}"])

  metric("requests_total", "counter", "requests finished (any reason)", m.requests)
  metric("requests_rejected_total", "counter", "requests refused with 429 (queue full)", m.rejected)
  metric("prompt_tokens_total", "counter", "prompt tokens prefilled", m.prompt_tokens)
  metric("generation_tokens_total", "counter", "tokens generated", m.generated_tokens)
  metric("queue_depth", "gauge", "requests waiting for a batch row", engine.queue_depth())
  metric("batch_rows_busy", "gauge", "batch rows holding a request", engine.busy_rows())
  metric("batch_rows", "gauge", "batch rows (--max-batch)", engine.B)
  metric("batch_occupancy", "gauge", "mean share of rows decoding per decode step", f"{occupancy:.6f}")
  if engine.runner is not None:  # the paged cache (the default; not with --fixed-rows)
    pool = engine.runner.pool
    metric("kv_pages", "gauge", "pages of the KV cache pool (the null page excluded)", pool.num_pages - 1)
    metric("kv_pages_free", "gauge", "pages free or holding only evictable cached prefixes", pool.available())
    metric("prefix_cache_queried_tokens_total", "counter", "prompt tokens looked up in the prefix cache",
           pool.stats.queried_tokens)
    metric("prefix_cache_hit_tokens_total", "counter", "prompt tokens reused from the prefix cache",
           pool.stats.hit_tokens)
    metric("prefix_cache_hit_rate", "gauge", "share of prompt tokens reused from the prefix cache",
           f"{pool.stats.hit_rate:.6f}")
    metric("preemptions_total", "counter", "requests preempted for lack of pages (recomputed later)",
           pool.stats.preempted)
  ttft = list(m.ttft)
  lines += ["# HELP mixtral_jax_time_to_first_token_seconds time from arrival to the first token",
            "# TYPE mixtral_jax_time_to_first_token_seconds histogram"]
  for le in TTFT_BUCKETS:
    lines.append(f'mixtral_jax_time_to_first_token_seconds_bucket{{le="{le}"}} {sum(t <= le for t in ttft)}')
  lines += [f'mixtral_jax_time_to_first_token_seconds_bucket{{le="+Inf"}} {len(ttft)}',
            f"mixtral_jax_time_to_first_token_seconds_sum {sum(ttft):.6f}",
            f"mixtral_jax_time_to_first_token_seconds_count {len(ttft)}"]
  return "\n".join(lines) + "\n"
