"""The bytes each token id of a sentencepiece vocabulary stands for.

Shared by structured output (the grammar engine's token trie) and logprobs (OpenAI's ``token`` and
``bytes`` fields). A normal piece is its text with sentencepiece's ``▁`` as a space; a byte-fallback
piece ``<0xNN>`` is the single byte 0xNN (often half a UTF-8 character); a control piece (``<s>``,
``</s>``, ``[INST]``...) and ``<unk>`` are ``0xFF`` + their name, the mark llguidance uses for special
tokens (0xFF never occurs in UTF-8 text, so no text can match them).
"""

from __future__ import annotations

import functools

import sentencepiece

SPECIAL_MARK = b"\xff"


def piece_bytes(sp: sentencepiece.SentencePieceProcessor) -> list[bytes]:
  """``[V]`` bytes of every token id of a loaded sentencepiece model (see the module docstring)."""
  out = []
  for i in range(sp.get_piece_size()):
    piece = sp.id_to_piece(i)
    if sp.is_control(i) or sp.is_unknown(i):
      out.append(SPECIAL_MARK + piece.encode())
    elif sp.is_byte(i):  # <0xNN>
      out.append(bytes([int(piece[3:-1], 16)]))
    else:
      out.append(piece.replace("\u2581", " ").encode())
  return out


@functools.lru_cache(maxsize=4)
def vocabulary_bytes(model_file: str) -> tuple[bytes, ...]:
  """:func:`piece_bytes` of the sentencepiece file ``model_file`` (a Tokenizer's ``path``), cached."""
  return tuple(piece_bytes(sentencepiece.SentencePieceProcessor(model_file=model_file)))
