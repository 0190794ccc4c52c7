"""SFT conversations: token ids and loss weights of one ``{"messages": [...]}`` example.

Each conversation ends with an assistant turn and is encoded by mistral-common's instruct template
(``mixtral_jax.chat.encode_chat``); the loss weight is 1 exactly on the assistant turns' tokens and their
closing ``</s>``.
"""

from __future__ import annotations

from .files import jsonl_records, line_of


def assistant_spans(messages: list[dict], version: str) -> tuple[list[int], list[float]]:
  """Tokens of a conversation ending with an assistant turn, and per-token loss weights (1 on every
  assistant turn's tokens and its ``</s>``).

  The full sequence is the template with the last turn as a prefix, plus ``</s>``. Each assistant turn's
  tokens are what its prefix encoding adds to the conversation before it; they are then located, in
  order, in the full sequence, followed by ``</s>`` (the template places system prompts and tools
  differently in truncated conversations, so offsets alone are not trusted)."""
  from mixtral_jax.chat import encode_chat, mistral_tokenizer  # noqa: PLC0415 (mistral-common is slow to import)
  if not messages or messages[-1].get("role") != "assistant":
    raise ValueError("an SFT conversation must end with an assistant turn (the text to learn)")
  eos = mistral_tokenizer(version).instruct_tokenizer.tokenizer.eos_id
  full = encode_chat(messages[:-1] + [{**messages[-1], "prefix": True}], version=version) + [eos]
  weights = [0.0] * len(full)
  cursor = 0
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    before = encode_chat(messages[:i], version=version) if i else []
    with_answer = encode_chat(messages[:i] + [{**m, "prefix": True}], version=version)
    answer = with_answer[len(before):] if with_answer[:len(before)] == before else None
    at = _find(full, answer + [eos], cursor) if answer else -1
    if at < 0:
      raise ValueError(f"could not locate assistant turn {i} in the encoded conversation ({version}); "
                       "this template's encoding of the turn depends on context")
    for j in range(at, at + len(answer) + 1):
      weights[j] = 1.0
    cursor = at + len(answer) + 1
  return full, weights


def _find(seq: list[int], sub: list[int], start: int) -> int:
  for j in range(start, len(seq) - len(sub) + 1):
    if seq[j:j + len(sub)] == sub:
      return j
  return -1


def chat_examples(path: str, version: str, start: int = 0, stop: int | None = None):
  """(byte offset, tokens, weights) of every conversation in a JSONL file piece, in order; errors name
  file:line."""
  for n, record in jsonl_records(path, start, stop):
    try:
      messages = record["messages"] if isinstance(record, dict) else record
      tokens, weights = assistant_spans(messages, version)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}:{line_of(path, n)}: not a usable chat example ({e}); each line must be "
                       '{"messages": [...]} ending with an assistant turn') from None
    yield n, tokens, weights
