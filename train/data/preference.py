"""Preference pairs for DPO: JSONL lines to token ids, and pairs to one batch of rows.

A line is ``{"prompt": str, "chosen": A, "rejected": A}`` or ``{"messages": [...], "chosen": A,
"rejected": A}`` where ``messages`` ends with a user (or tool) turn and each answer ``A`` is a string or
a list holding one assistant message (TRL's conversational form). Encoding, by mistral-common's instruct
template (``mixtral_jax.chat.encode_chat``):

  prompt_ids = encode_chat(messages)                                   (BOS ... [/INST])
  answer_ids = encode_chat(messages + [assistant answer as prefix])[len(prompt_ids):] + [EOS]

The prompt is shared: only the answers differ between the two rows of a pair, and only answer tokens
(and their EOS) are scored. Errors name file:line and the field.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from .files import jsonl_records, line_of


class Pair(NamedTuple):
  prompt: list[int]
  chosen: list[int]  # answer tokens, EOS last
  rejected: list[int]


def _answer_text(value, field: str) -> str:
  if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
    if value[0].get("role", "assistant") != "assistant":
      raise ValueError(f"{field!r} holds a {value[0].get('role')!r} message; it must be the assistant's answer")
    value = value[0].get("content")
  if not isinstance(value, str):
    raise ValueError(f"{field!r} must be a string or a list of one assistant message")
  if not value.strip():
    raise ValueError(f"{field!r} is an empty answer")
  return value


def _prompt_messages(record: dict) -> list[dict]:
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise ValueError("'messages' must be a non-empty list of turns ending with a user turn")
    return messages
  if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
    raise ValueError("'prompt' (a non-empty string) or 'messages' is missing")
  return [{"role": "user", "content": record["prompt"]}]


def encode_pair(record, version: str = "v1") -> Pair:
  """The token ids of one preference line (module docstring); ValueError names the field at fault."""
  from mixtral_jax.chat import encode_chat, mistral_tokenizer  # noqa: PLC0415 (mistral-common is slow to import)
  if not isinstance(record, dict):
    raise ValueError("a preference line must be a JSON object")
  for field in ("chosen", "rejected"):
    if field not in record:
      raise ValueError(f"the {field!r} answer is missing")
  messages = _prompt_messages(record)
  eos = mistral_tokenizer(version).instruct_tokenizer.tokenizer.eos_id
  prompt = encode_chat(messages, version=version)
  answers = []
  for field in ("chosen", "rejected"):
    text = _answer_text(record[field], field)
    full = encode_chat(messages + [{"role": "assistant", "content": text, "prefix": True}], version=version)
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
      raise ValueError(f"the {field!r} answer does not extend the prompt's encoding ({version} template)")
    answers.append(full[len(prompt):] + [eos])
  return Pair(prompt, answers[0], answers[1])


def preference_pairs(path: str, version: str = "v1", start: int = 0,
                     stop: int | None = None) -> Iterator[tuple[int, Pair]]:
  """(byte offset, :class:`Pair`) of every line of a JSONL file piece, in order; errors name file:line."""
  for offset, record in jsonl_records(path, start, stop):
    try:
      pair = encode_pair(record, version)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}:{line_of(path, offset)}: not a usable preference pair: {e}; each line must be "
                       '{"prompt" | "messages", "chosen", "rejected"} with non-empty answers') from None
    yield offset, pair


def pair_rows(pair: Pair, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 ``[2, T + 1]``, weights float32 ``[2, T + 1]``): the chosen row, then the rejected row,
  each ``prompt + answer`` right-padded with 0; weight 1 on answer tokens. An answer that does not fit is
  cut (both rows keep their full prompt, so the pair stays comparable). T + 1 tokens give T next-token
  predictions, as the LM rows do."""
  tokens = np.zeros((2, seq_len + 1), np.int32)
  weights = np.zeros((2, seq_len + 1), np.float32)
  if len(pair.prompt) >= seq_len:
    raise ValueError(f"a prompt of {len(pair.prompt)} tokens leaves no room for its answer in seq_len={seq_len}; "
                     "raise data.seq_len or shorten the prompts")
  for row, answer in enumerate((pair.chosen, pair.rejected)):
    seq = (pair.prompt + answer)[:seq_len + 1]
    tokens[row, :len(seq)] = seq
    weights[row, len(pair.prompt):len(seq)] = 1.0
  return tokens, weights


def pair_batch(pairs: list[Pair], seq_len: int) -> dict[str, np.ndarray]:
  """The train step's batch fields (``inputs``, ``targets``, ``weights``, ``segment_ids``, ``positions``,
  each ``[2B, T]``) for ``pairs``: all chosen rows first, then all rejected rows, so one forward scores
  every answer and ``mixtral_jax.train.dpo.split_pairs`` halves the result. ``weights`` marks the answer
  tokens among the targets; ``segment_ids`` is 1 on real tokens and 0 on padding."""
  rows = [pair_rows_fields(p, seq_len) for p in pairs]
  return {k: np.concatenate([np.stack([r[k][0] for r in rows]), np.stack([r[k][1] for r in rows])])
          for k in rows[0]}


class PairRows:
  """Preference pairs as rows for ``train.data.pipeline.BatchIterator``: row i is pair i's chosen and
  rejected rows, each field ``[2, T]`` (the iterator flattens it to ``2T``; the DPO step un-flattens
  with :func:`unflatten_pairs`). Pairs held in memory, already encoded; ``__getitem__`` only pads.
  Training streams pairs from shards instead (``preference_shards.PreferenceRows``, the same rows); this
  in-memory form is the tests' reference."""

  def __init__(self, pairs: list[Pair], seq_len: int):
    self.pairs, self.seq_len = list(pairs), seq_len

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return pair_rows_fields(self.pairs[i], self.seq_len)


def pair_rows_fields(pair: Pair, seq_len: int) -> dict[str, np.ndarray]:
  """The five batch fields (``[2, T]`` each: chosen row, rejected row) of one pair."""
  tokens, weights = pair_rows(pair, seq_len)
  lengths = np.array([len(pair.prompt) + len(pair.chosen), len(pair.prompt) + len(pair.rejected)])
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (2, seq_len))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights[:, 1:],
          "segment_ids": (positions < lengths[:, None]).astype(np.int32), "positions": positions.copy()}


def unflatten_pairs(x_xb2T: np.ndarray, seq_len: int):
  """``[..., b, 2T]`` (the iterator's flattened pair rows) -> ``[..., 2b, T]``: the b chosen rows, then
  the b rejected rows (:func:`pair_batch`'s layout). Works on NumPy and JAX arrays."""
  *lead, b, _ = x_xb2T.shape
  x = x_xb2T.reshape(*lead, b, 2, seq_len)
  x = x.swapaxes(-3, -2)  # [..., 2, b, T]
  return x.reshape(*lead, 2 * b, seq_len)
