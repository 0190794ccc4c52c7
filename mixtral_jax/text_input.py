"""Text that cannot be tokenized: a Python ``str`` holding surrogate code points (U+D800..U+DFFF).

Such a string has no UTF-8 form, and SentencePiece's binding fails on it with a C++ cast error. It
arises from a lone surrogate in JSON (``"\\ud800"``), from a ``str`` built in Python, and from bytes that
are not UTF-8: Python decodes command-line arguments with ``surrogateescape``, so byte 0xff becomes
U+DCFF. The checks here find the first such code point and name it (as the byte it stood for, when it
came from ``surrogateescape``), so every entry point can refuse it in one line before the tokenizer.
"""

from __future__ import annotations

from typing import Any


def undecodable(text: str) -> str | None:
  """Why ``text`` cannot be encoded as UTF-8 (the first bad character and its position), else None."""
  try:
    text.encode("utf-8")
    return None
  except UnicodeEncodeError as e:
    code = ord(text[e.start])
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte code - 0xDC00
      return f"byte 0x{code - 0xDC00:02x} at character {e.start} is not UTF-8"
    return f"a lone surrogate U+{code:04X} at character {e.start} is not a Unicode character"


def first_undecodable(value: Any) -> str | None:
  """``undecodable`` of the first bad string anywhere in a JSON-like value (strings, lists, dict keys
  and values), else None."""
  if isinstance(value, str):
    return undecodable(value)
  items = value.items() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
  for item in items:
    found = first_undecodable(item)
    if found:
      return found
  return None


def check_text(text: str, what: str) -> None:
  """Raises a one-line ValueError naming ``what`` (e.g. "prompt 0") when ``text`` is not valid text."""
  problem = undecodable(text)
  if problem:
    raise ValueError(f"{what} is not valid UTF-8 text: {problem}; pass the text as UTF-8")
