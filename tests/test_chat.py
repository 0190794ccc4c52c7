"""Chat and tool prompts: encode_chat against mistral-common's own encoder on generated conversations
(expected side built from mistral-common request objects directly), tool-call parsing, bad inputs."""

import json
import random
import re

import pytest
from mistral_common.protocol.instruct.chunk import TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_jax.chat import encode_chat, parse_tool_calls
from mixtral_jax.tokenizer import Tokenizer

TEXTS = ["Hi!", "What is the capital of France?", "Explain MoE routing in two sentences.", "café, naïve, Ångström",
         "def f(x):\n    return x ** 2", "Translate: 你好，世界", "  leading spaces and trailing  ",
         "Line one\nLine two\n\n",
         "Numbers 3.14159 and 1,000,000", "Emoji 🚀🔥 ok", "tabs\tand\tcolumns", "Sure. Here you go:", "[INST] literal"]
SYSTEMS = ["You are a helpful assistant.", "Answer in French.", "Be brief.\nNever apologise."]
TOOLS = [
    {"name": "get_weather", "description": "Current weather for a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"]}},
    {"name": "search_web", "description": "Search the web",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}},
                    "required": ["query"]}},
    {"name": "add-numbers", "description": "",
     "parameters": {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "number"}}}}},
    {"name": "no_args", "description": "Takes nothing", "parameters": {}},
]
ARGS = {"get_weather": [{"city": "Paris"}, {"city": "Zürich", "unit": "celsius"}],
        "search_web": [{"query": "mixtral 8x22b"}, {"query": "東京 天気", "top_k": 3}],
        "add-numbers": [{"values": [1, 2.5, -3]}], "no_args": [{}]}
RESULTS = ['{"temperature": 21, "sky": "clear"}', "No results found.", "[1, 2, 3]", '"7.5"', "Zürich: 4°C, snow"]


def _text(rng):
  """A str, or (sometimes) a tuple of text parts, which both sides encode as chunks."""
  if rng.random() < 0.15:
    return tuple(rng.choice(TEXTS) for _ in range(2))
  return rng.choice(TEXTS)


def _call_id(rng):
  return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(9))


def conversation(rng, tools_allowed):
  """An abstract conversation: (turns, tool defs). Turns: ('system'|'user'|'assistant'|'prefix', text),
  ('calls', [(id, name, args)]), ('tool', id, name or None, result)."""
  turns = []
  for _ in range(rng.choice([0, 0, 1, 1, 2])):
    turns.append(("system", rng.choice(SYSTEMS)))
  tools = rng.sample(TOOLS, rng.randint(1, 3)) if tools_allowed and rng.random() < 0.8 else []
  for r in range(rng.randint(1, 4)):
    turns.append(("user", _text(rng)))
    if rng.random() < 0.1:
      turns.append(("user", _text(rng)))
    if tools and rng.random() < 0.6:
      called = rng.sample(tools, rng.randint(1, min(2, len(tools))))
      calls = [(_call_id(rng), t["name"], rng.choice(ARGS[t["name"]])) for t in called]
      turns.append(("calls", calls))
      turns.extend(("tool", cid, rng.choice([name, None]), rng.choice(RESULTS)) for cid, name, _ in calls)
      if rng.random() < 0.4:
        continue  # the conversation may end on tool results, or go on with a user turn
    turns.append(("assistant", rng.choice(TEXTS).rstrip() or "ok"))
  if turns[-1][0] == "assistant":
    if rng.random() < 0.2:
      turns[-1] = ("prefix", turns[-1][1])
    else:
      turns.append(("user", _text(rng)))
  return turns, tools


def as_dicts(turns, tools, rng):
  """The OpenAI/Mistral-style dicts a user passes to encode_chat, in varied but equivalent forms."""
  def content(text):
    return [{"type": "text", "text": t} for t in text] if isinstance(text, tuple) else text

  messages = []
  for turn in turns:
    kind = turn[0]
    if kind in ("system", "user"):
      messages.append({"role": kind, "content": content(turn[1])})
    elif kind in ("assistant", "prefix"):
      messages.append({"role": "assistant", "content": turn[1], **({"prefix": True} if kind == "prefix" else {})})
    elif kind == "calls":
      openai = rng.random() < 0.5
      calls = [{"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}} if openai
               else {"id": cid, "name": name, "arguments": args} for cid, name, args in turn[1]]
      messages.append({"role": "assistant", "content": None, "tool_calls": calls})
    else:
      _, cid, name, result = turn
      messages.append({"role": "tool", "tool_call_id": cid, "content": result, **({"name": name} if name else {})})
  tool_dicts = [{"type": "function", "function": dict(t)} for t in tools] or None
  return messages, tool_dicts


def as_request(turns, tools):
  """The same conversation built directly from mistral-common's request objects."""
  def content(text):
    return [TextChunk(text=t) for t in text] if isinstance(text, tuple) else text

  messages = []
  for turn in turns:
    kind = turn[0]
    if kind == "system":
      messages.append(SystemMessage(content=content(turn[1])))
    elif kind == "user":
      messages.append(UserMessage(content=content(turn[1])))
    elif kind in ("assistant", "prefix"):
      messages.append(AssistantMessage(content=turn[1], prefix=kind == "prefix"))
    elif kind == "calls":
      messages.append(AssistantMessage(tool_calls=[
          ToolCall(id=cid, function=FunctionCall(name=name, arguments=args)) for cid, name, args in turn[1]]))
    else:
      _, cid, name, result = turn
      messages.append(ToolMessage(tool_call_id=cid, name=name, content=result))
  tool_objs = [Tool(function=Function(name=t["name"], description=t["description"], parameters=t["parameters"]))
               for t in tools]
  return ChatCompletionRequest(messages=messages, tools=tool_objs or None)


@pytest.fixture(scope="module")
def mistral():
  return {"v1": MistralTokenizer.v1(), "v3": MistralTokenizer.v3()}


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_encode_chat_matches_mistral_common(version, mistral):
  rng = random.Random(f"chat-{version}")
  seen = {"system": 0, "multi_turn": 0, "prefix": 0, "tools": 0, "calls": 0, "tool": 0}
  for _ in range(60):
    turns, tools = conversation(rng, tools_allowed=version == "v3")
    messages, tool_dicts = as_dicts(turns, tools, rng)
    expected = mistral[version].encode_chat_completion(as_request(turns, tools)).tokens
    assert encode_chat(messages, tool_dicts, version=version) == expected, (turns, tools)
    kinds = [t[0] for t in turns]
    seen["system"] += "system" in kinds
    seen["multi_turn"] += kinds.count("user") > 1
    seen["prefix"] += "prefix" in kinds
    seen["tools"] += bool(tools)
    seen["calls"] += "calls" in kinds
    seen["tool"] += "tool" in kinds
  assert all(seen[k] >= 5 for k in ("system", "multi_turn", "prefix")), seen
  if version == "v3":
    assert all(seen[k] >= 10 for k in ("tools", "calls", "tool")), seen


def test_v3_prompt_layout(mistral):
  """The control tokens land where the v3 format puts them."""
  tok = Tokenizer.load("v3")
  messages = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "name": "get_weather",
                                                     "arguments": {"city": "Paris"}}]},
              {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'}]
  ids = encode_chat(messages, [{"type": "function", "function": TOOLS[0]}], version="v3")
  text = tok.decode(ids, keep_special=True)
  assert re.fullmatch(r"<s>\[AVAILABLE_TOOLS\]\[\{.*get_weather.*\}\]\[/AVAILABLE_TOOLS\]"
                      r"\[INST\]Weather in Paris\?\[/INST\]\[TOOL_CALLS\]\[\{.*\}\]</s>"
                      r"\[TOOL_RESULTS\]\{.*abcDEF123.*\}\[/TOOL_RESULTS\]", text), text
  v1 = encode_chat([{"role": "user", "content": "Hi"}], version="v1")
  assert Tokenizer.load("v1").decode(v1, keep_special=True) == "<s>[INST] Hi [/INST]"


def test_tool_calls_parse_round_trip(mistral):
  """Tool calls encoded by mistral-common, decoded from the ids after [TOOL_CALLS], parse back to the
  calls; fed back as an assistant message they give the same ids."""
  tok = Tokenizer.load("v3")
  rng = random.Random(7)
  for n in range(12):
    chosen = rng.sample(TOOLS, rng.randint(1, 3))
    calls = [(_call_id(rng), t["name"], rng.choice(ARGS[t["name"]])) for t in chosen]
    turns = [("user", "please"), ("calls", calls)] + [("tool", cid, None, "done") for cid, _, _ in calls]
    ids = mistral["v3"].encode_chat_completion(as_request(turns, TOOLS)).tokens
    start = ids.index(tok.special_id("[TOOL_CALLS]"))
    end = ids.index(tok.eos_id, start)
    with_marker = tok.decode(ids[start:end + 1], keep_special=True)
    payload = tok.decode(ids[start + 1:end])
    expected = [{"name": name, "arguments": args, "id": cid} for cid, name, args in calls]
    assert parse_tool_calls(with_marker) == expected
    assert parse_tool_calls("Let me check. " + with_marker) == expected
    assert parse_tool_calls(payload) == expected
    messages, _ = as_dicts(turns, TOOLS, rng)
    messages[1] = {"role": "assistant", "tool_calls": parse_tool_calls(payload)}
    assert encode_chat(messages, [{"type": "function", "function": t} for t in TOOLS], version="v3") == ids, n


def test_parse_tool_calls_fills_ids_and_accepts_variants():
  calls = parse_tool_calls(
      '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": "{\\"y\\": 2}"}]')
  assert [(c["name"], c["arguments"]) for c in calls] == [("a", {"x": 1}), ("b", {"y": 2})]
  assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", c["id"]) for c in calls) and calls[0]["id"] != calls[1]["id"]
  assert parse_tool_calls('{"name": "solo", "arguments": null}')[0]["arguments"] == {}
  assert parse_tool_calls('[{"name": "a", "arguments": {}, "id": "abcdefghi"}]  \n')[0]["id"] == "abcdefghi"


@pytest.mark.parametrize("text,match", [
    ("[TOOL_CALLS]", "nothing follows"),
    ("[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {", "not valid JSON"),
    ("[TOOL_CALLS] [{\"arguments\": {}}]", "tool call 0 must be an object with a 'name'"),
    ("[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": [1]}]", r"tool call 0 \(a\) has arguments \[1\]"),
    ("[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": \"{oops\"}]",
     r"tool call 0 \(a\) has arguments that are not valid JSON"),
    ("[TOOL_CALLS] []", "non-empty JSON list"),
    ("[TOOL_CALLS] \"just a string\"", "non-empty JSON list"),
    ("[TOOL_CALLS] [{\"name\": \"a\"}] and then some prose", "unexpected text after the tool-call JSON"),
    ("I think the answer is 4.", "not valid JSON"),
])
def test_parse_tool_calls_errors(text, match):
  with pytest.raises(ValueError, match=match):
    parse_tool_calls(text)


USER = {"role": "user", "content": "hi"}
GOOD_TOOL = {"type": "function", "function": TOOLS[0]}


@pytest.mark.parametrize("messages,tools,version,match", [
    ([], None, "v1", "messages is empty"),
    (None, None, "v3", "messages is empty"),
    ([{"role": "robot", "content": "beep"}], None, "v1", r"messages\[0\] has unknown role 'robot'"),
    ([{"content": "no role"}], None, "v1", r"messages\[0\] has unknown role None"),
    (["just a string"], None, "v1", r"messages\[0\] must be a dict"),
    ([{"role": "user"}], None, "v1", r"messages\[0\] \(user\) has no 'content'"),
    ([{"role": "user", "content": 42}], None, "v1", r"messages\[0\].content must be a str"),
    ([{"role": "user", "content": "x", "tool_calls": []}], None, "v1", r"unsupported keys \['tool_calls'\]"),
    ([USER, {"role": "assistant"}, USER], None, "v1", r"messages\[1\] \(assistant\) needs content or tool_calls"),
    ([USER, {"role": "assistant", "content": "ok"}], None, "v1", "rejected the conversation.*last role"),
    ([{"role": "assistant", "content": "alone"}], None, "v1", "rejected the conversation.*start with a user"),
    ([USER, {"role": "tool", "tool_call_id": "abcdefghi", "content": "x"}], None, "v3",
     "rejected the conversation.*Unexpected role 'tool' after role 'user'"),
    ([USER], None, "v2", "unknown chat version 'v2'"),
    ([USER], [GOOD_TOOL], "v1", "v1 format .* has no tool calling"),
    ([USER], {"type": "function"}, "v3", "tools must be a list"),
    ([USER], [{"type": "function"}], "v3", r"tools\[0\] must be \{'type': 'function'"),
    ([USER], [{"type": "retrieval", "function": TOOLS[0]}], "v3", r"tools\[0\] has type 'retrieval'"),
    ([USER], [{"type": "function", "function": {"description": "no name"}}], "v3", r"tools\[0\].function.name must be"),
    ([USER], [{"type": "function", "function": {"name": "has space"}}], "v3", r"tools\[0\].function.name must be"),
    ([USER], [{"type": "function", "function": {"name": "f", "parameters": ["x"]}}], "v3",
     r"tools\[0\].function.parameters must be a JSON-schema object"),
    ([USER], [GOOD_TOOL, {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "v3",
     r"tools\[1\].function.parameters.type must be 'object'"),
    ([USER], [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": ["a"]}}}],
     "v3", r"properties must map each argument name"),
    ([USER], [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}}}], "v3",
     r"required names \['b'\], which are not in properties"),
    ([USER], [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}], "v3",
     "rejected the conversation.*Invalid tool schema"),
    ([USER], [{"type": "function", "function": {"name": "f", "params": {}}}], "v3", r"unsupported keys \['params'\]"),
    ([USER, {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "name": "f", "arguments": "{bad"}]}], None, "v3",
     r"messages\[1\].tool_calls\[0\].arguments is not valid JSON"),
    ([USER, {"role": "assistant", "tool_calls": {"name": "f"}}], None, "v3",
     r"messages\[1\].tool_calls must be a list"),
    ([USER, {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "function": {"arguments": {}}}]}], None, "v3",
     r"messages\[1\].tool_calls\[0\] needs a function name"),
    ([USER, {"role": "assistant", "tool_calls": [{"id": "short", "name": "f", "arguments": {}}]},
      {"role": "tool", "tool_call_id": "short", "content": "x"}], None, "v3",
     "rejected the conversation.*Tool call id"),
    ([USER, {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "name": "f", "arguments": {}}]},
      {"role": "tool", "tool_call_id": "abcdefghi", "content": "x"}], None, "v1", "v1 format .* has no tool calling"),
])
def test_bad_chat_input(messages, tools, version, match):
  with pytest.raises(ValueError, match=match):
    encode_chat(messages, tools, version=version)
