"""Incremental detokenization: the text of a growing token list, decoding only its recent tail.

Streaming a reply needs ``decode(tokens)`` after every new token. Decoding the whole list each time
costs O(n) per token, O(n^2) per reply. :class:`IncrementalText` keeps a *stable point* ``s``: the
longest prefix whose text ``T = decode(tokens[:s])`` did not end in U+FFFD (so no byte-fallback
character was left unfinished there). Then, for the tokens after it:

  decode(tokens) = T + decode(anchor + tokens[s:])[len(decode(anchor)):]

``anchor`` is the encoding of a plain letter. It stands in for the text before ``s``: sentencepiece drops
the leading space of the first piece of a decode, so decoding ``tokens[s:]`` alone would lose the space
of a word that starts right after ``s``; after the anchor the space is kept, as it is in the full decode.
The identity needs ``T`` non-empty (before any text, the first piece's space *is* dropped), so until
then the whole list is decoded. Byte-fallback tokens of one character are never split by ``s``: an
unfinished character decodes to U+FFFD, and the stable point does not move past it; a finished one
decodes the same whatever follows (UTF-8 is self-synchronising).

Each call decodes ``tokens[s:]`` plus one token: a few tokens in normal text, the run of an
unfinished character in byte-fallback text. Tests compare it with the full decode on random token
streams (control tokens, bytes, multi-byte characters) with the real v1 and v3 tokenizers.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalText:
  """``decode(tokens)`` of the list ``tokens`` (shared, appended to by the caller) after each append.

  ``tokenizer``: anything with ``encode(text, bos=False)`` and ``decode(ids)`` (a
  :class:`mixtral_jax.tokenizer.Tokenizer`).
  """

  def __init__(self, tokenizer, tokens: list[int]):
    self.tokenizer, self.tokens = tokenizer, tokens
    self.anchor = list(tokenizer.encode("a", bos=False))
    self.anchor_text = tokenizer.decode(self.anchor)
    self.stable = 0  # s: tokens[:s] decode to self.stable_text, which does not end in U+FFFD
    self.stable_text = ""

  def text(self) -> str:
    """``tokenizer.decode(tokens)`` for the tokens now in the list (may end in U+FFFD while a
    byte-fallback character is unfinished)."""
    text = None
    if self.stable_text:
      window = self.tokenizer.decode(self.anchor + self.tokens[self.stable:])
      if window.startswith(self.anchor_text):
        text = self.stable_text + window[len(self.anchor_text):]
    if text is None:  # no text yet (or a tokenizer that does not keep the anchor): decode it all
      text = self.tokenizer.decode(self.tokens)
    if not text.endswith(REPLACEMENT):
      self.stable, self.stable_text = len(self.tokens), text
    return text
