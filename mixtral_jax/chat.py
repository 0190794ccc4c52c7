"""Mistral chat and function-calling prompts, through mistral-common's own encoder.

The instruct templates are not written here. ``encode_chat`` maps OpenAI/Mistral-style message and
tool dicts onto mistral-common's request objects (``ChatCompletionRequest`` of ``SystemMessage``,
``UserMessage``, ``AssistantMessage``, ``ToolMessage``; ``Tool``/``Function``; ``ToolCall``/
``FunctionCall``) and calls ``MistralTokenizer.v1()/.v3().encode_chat_completion``:

  * ``v1``, Mixtral-8x7B-Instruct: ``<s>[INST] user [/INST] answer</s>[INST] ...``, text tokens only;
    a system prompt is prepended to the first user turn. No tools.
  * ``v3``, Mixtral-8x22B-Instruct: ``[INST]``/``[/INST]`` are control tokens; tool definitions go in
    ``[AVAILABLE_TOOLS] [...] [/AVAILABLE_TOOLS]`` before the last user turn, the model's calls after
    ``[TOOL_CALLS]`` as a JSON list, tool outputs in ``[TOOL_RESULTS] {...} [/TOOL_RESULTS]``; a
    system prompt is prepended to the last user turn. Tool-call ids are 9 letters or digits.

Message dicts, by role (other keys are refused rather than silently dropped):
  ``{"role": "system" | "user", "content": str}``
  ``{"role": "assistant", "content": str | None, "tool_calls": [call, ...], "prefix": bool}``
  ``{"role": "tool", "content": str, "tool_call_id": str, "name": str}``
Content may also be a list of OpenAI text parts ``[{"type": "text", "text": str}, ...]``. A call is
OpenAI's ``{"id", "type": "function", "function": {"name", "arguments"}}`` or the flat
``{"id", "name", "arguments"}`` that :func:`parse_tool_calls` returns; arguments are a dict or a JSON
string. A tool is ``{"type": "function", "function": {"name", "description", "parameters"}}``.

mistral-common is imported on first use: it takes about a second, and ``import mixtral_jax`` stays light.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import string

VERSIONS = ("v1", "v3")
ROLE_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls", "prefix"},
    "tool": {"role", "content", "tool_call_id", "name"},
}
TOOL_CALLS = "[TOOL_CALLS]"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # mistral-common's rule for function names
_ID_CHARS = string.ascii_letters + string.digits


@functools.cache
def mistral_tokenizer(version: str):
  """mistral-common's ``MistralTokenizer.v1()`` or ``.v3()`` (sentencepiece), built once per version."""
  from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: PLC0415 (see module doc)
  if version not in VERSIONS:
    raise ValueError(f"unknown chat version {version!r}; use 'v1' (Mixtral-8x7B-Instruct) or 'v3' "
                     "(Mixtral-8x22B-Instruct)")
  return MistralTokenizer.v1() if version == "v1" else MistralTokenizer.v3()


def encode_chat(messages: list[dict], tools: list[dict] | None = None, version: str = "v1") -> list[int]:
  """Token ids of a conversation as a prompt, BOS first, exactly as mistral-common encodes it.

  The conversation ends with a user or tool turn (the model answers next) or with an assistant
  turn marked ``"prefix": True`` (the model continues it); mistral-common's rules on the order of
  turns apply. Anything it refuses comes back as a ValueError naming the cause.
  """
  request = chat_request(messages, tools, version)
  from mistral_common.exceptions import MistralCommonException  # noqa: PLC0415 (see module doc)
  try:
    return list(mistral_tokenizer(version).encode_chat_completion(request).tokens)
  except (MistralCommonException, ValueError) as e:
    raise ValueError(f"mistral-common rejected the conversation ({version}): {e}") from None


def chat_request(messages: list[dict], tools: list[dict] | None = None, version: str = "v1"):
  """The mistral-common ``ChatCompletionRequest`` for ``messages`` and ``tools``, after checking them."""
  from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: PLC0415
  mistral_tokenizer(version)  # validates the version name first
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError("messages is empty; pass a list of role/content dicts with at least one user message")
  if tools is not None and not isinstance(tools, (list, tuple)):
    raise ValueError(f"tools must be a list of tool dicts, got {type(tools).__name__}")
  chat_messages = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
  tool_objs = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools or [])]
  if version == "v1" and (tool_objs or any(_uses_tools(m) for m in chat_messages)):
    raise ValueError("the v1 format (Mixtral-8x7B-Instruct) has no tool calling; drop the tools, tool "
                     "calls and tool messages, or use version='v3' (Mixtral-8x22B-Instruct)")
  return ChatCompletionRequest(messages=chat_messages, tools=tool_objs or None)


def _uses_tools(message) -> bool:
  return message.role == "tool" or bool(getattr(message, "tool_calls", None))


def _content(value, where: str, optional: bool = False):
  """A message's content: a str, or OpenAI text parts as mistral-common ``TextChunk``s."""
  from mistral_common.protocol.instruct.chunk import TextChunk  # noqa: PLC0415
  if isinstance(value, str) or (optional and value is None):
    return value
  if isinstance(value, list) and value and all(
      isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
    return [TextChunk(text=p["text"]) for p in value]
  raise ValueError(f"{where}.content must be a str or a list of {{'type': 'text', 'text': str}} parts, "
                   f"got {value!r:.80}")


def _message(m, where: str):
  """One message dict -> the mistral-common message of its role."""
  from mistral_common.protocol.instruct.messages import (  # noqa: PLC0415
      AssistantMessage, SystemMessage, ToolMessage, UserMessage)
  if not isinstance(m, dict):
    raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(m).__name__}")
  role = m.get("role")
  if role not in ROLE_KEYS:
    raise ValueError(f"{where} has unknown role {role!r}; use one of {', '.join(ROLE_KEYS)}")
  extra = set(m) - ROLE_KEYS[role]
  if extra:
    raise ValueError(f"{where} ({role}) has unsupported keys {sorted(extra)}; a {role} message takes "
                     f"{sorted(ROLE_KEYS[role])}")
  if role == "assistant":
    calls = m.get("tool_calls") or []
    if not isinstance(calls, (list, tuple)):
      raise ValueError(f"{where}.tool_calls must be a list of calls, got {type(calls).__name__}")
    content = _content(m.get("content"), where, optional=True)
    if not calls and not content:
      raise ValueError(f"{where} (assistant) needs content or tool_calls")
    return AssistantMessage(content=content, prefix=bool(m.get("prefix", False)),
                            tool_calls=[_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
                            or None)
  if "content" not in m:
    raise ValueError(f"{where} ({role}) has no 'content'")
  content = _content(m["content"], where)
  if role == "system":
    return SystemMessage(content=content)
  if role == "user":
    return UserMessage(content=content)
  for key in ("tool_call_id", "name"):
    if m.get(key) is not None and not isinstance(m[key], str):
      raise ValueError(f"{where}.{key} must be a str, got {m[key]!r:.80}")
  return ToolMessage(content=content, tool_call_id=m.get("tool_call_id"), name=m.get("name"))


def _tool_call(call, where: str):
  """An OpenAI-style or flat tool call dict -> mistral-common ``ToolCall``."""
  from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall  # noqa: PLC0415
  if not isinstance(call, dict):
    raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
  if call.get("type", "function") != "function":
    raise ValueError(f"{where} has type {call['type']!r}; only 'function' calls exist")
  fn = call["function"] if "function" in call else call
  if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
    raise ValueError(f"{where} needs a function name of 1-64 letters, digits, '_' or '-', got {fn!r:.120}")
  args = fn.get("arguments", {})
  if isinstance(args, str):
    try:
      args = json.loads(args)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}.arguments is not valid JSON ({e}): {fn['arguments']!r:.120}") from None
  if not isinstance(args, dict):
    raise ValueError(f"{where}.arguments must be a JSON object, got {args!r:.120}")
  call_id = call.get("id", "null")
  if not isinstance(call_id, str):
    raise ValueError(f"{where}.id must be a str, got {call_id!r}")
  return ToolCall(id=call_id, function=FunctionCall(name=fn["name"], arguments=json.dumps(args)))


def _tool(tool, where: str):
  """An OpenAI-style function tool dict -> mistral-common ``Tool``."""
  from mistral_common.protocol.instruct.tool_calls import Function, Tool  # noqa: PLC0415
  if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
    raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name', 'description', "
                     f"'parameters'}}}}, got {tool!r:.120}")
  if tool.get("type", "function") != "function":
    raise ValueError(f"{where} has type {tool['type']!r}; only 'function' tools exist")
  fn = tool["function"]
  unknown = set(fn) - {"name", "description", "parameters", "strict"}
  if unknown:
    raise ValueError(f"{where}.function has unsupported keys {sorted(unknown)}; it takes name, description, "
                     "parameters, strict")
  if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
    raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {fn.get('name')!r}")
  description = fn.get("description") or ""
  if not isinstance(description, str):
    raise ValueError(f"{where}.function.description must be a str, got {description!r:.80}")
  parameters = fn.get("parameters") or {}
  if not isinstance(parameters, dict):
    raise ValueError(f"{where}.function.parameters must be a JSON-schema object (a dict), got "
                     f"{parameters!r:.80}")
  _check_schema(parameters, f"{where}.function.parameters")
  return Tool(function=Function(name=fn["name"], description=description, parameters=parameters,
                                strict=bool(fn.get("strict", False))))


def _check_schema(schema: dict, where: str) -> None:
  """Structural checks of a function's JSON schema, naming the offending field."""
  if "type" in schema and schema["type"] != "object":
    raise ValueError(f"{where}.type must be 'object' (the arguments are a JSON object), got {schema['type']!r}")
  properties = schema.get("properties", {})
  if not isinstance(properties, dict) or not all(isinstance(v, dict) for v in properties.values()):
    raise ValueError(f"{where}.properties must map each argument name to its schema dict, got {properties!r:.120}")
  required = schema.get("required", [])
  if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
    raise ValueError(f"{where}.required must be a list of argument names, got {required!r:.80}")
  missing = [r for r in required if properties and r not in properties]
  if missing:
    raise ValueError(f"{where}.required names {missing}, which are not in properties")


def new_tool_call_id() -> str:
  """A fresh call id of 9 letters and digits, the form the v3 format requires."""
  return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def parse_tool_calls(text: str) -> list[dict]:
  """Structured calls from model output: ``[{"name": str, "arguments": dict, "id": str}, ...]``.

  ``text`` is what the model wrote after ``[TOOL_CALLS]``, or decoded output that contains the
  marker (only what follows its first occurrence is read). The payload is the JSON list of calls of
  the v3 format (a single call object is accepted too); trailing ``</s>`` and whitespace are ignored.
  A call without an id gets a fresh one, so the result can go back into an assistant message.
  """
  if not isinstance(text, str):
    raise TypeError(f"parse_tool_calls takes a str, got {type(text).__name__}")
  payload = text.split(TOOL_CALLS, 1)[1] if TOOL_CALLS in text else text
  payload = payload.strip()
  payload = payload.removesuffix("</s>").strip()
  if not payload:
    raise ValueError(f"no tool calls in the model output {text!r:.120}: nothing follows {TOOL_CALLS}")
  try:
    value, end = json.JSONDecoder().raw_decode(payload)
  except json.JSONDecodeError as e:
    raise ValueError(f"the tool calls are not valid JSON ({e}): {payload!r:.200}") from None
  if payload[end:].strip():
    raise ValueError(f"unexpected text after the tool-call JSON: {payload[end:]!r:.120}")
  calls = [value] if isinstance(value, dict) else value
  if not isinstance(calls, list) or not calls:
    raise ValueError(f"the tool calls must be a non-empty JSON list of {{'name', 'arguments'}} objects, got "
                     f"{payload!r:.200}")
  return [_parsed_call(c, i) for i, c in enumerate(calls)]


def _parsed_call(call, i: int) -> dict:
  if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
    raise ValueError(f"tool call {i} must be an object with a 'name' string, got {call!r:.120}")
  args = call.get("arguments", {})
  if isinstance(args, str):  # some models emit the arguments as a JSON string
    try:
      args = json.loads(args)
    except json.JSONDecodeError as e:
      raise ValueError(f"tool call {i} ({call['name']}) has arguments that are not valid JSON ({e})") from None
  if args is None:
    args = {}
  if not isinstance(args, dict):
    raise ValueError(f"tool call {i} ({call['name']}) has arguments {args!r:.80}; they must be a JSON object")
  call_id = call.get("id")
  if call_id is not None and not isinstance(call_id, str):
    raise ValueError(f"tool call {i} ({call['name']}) has a non-string id {call_id!r}")
  return {"name": call["name"], "arguments": args, "id": call_id or new_tool_call_id()}
