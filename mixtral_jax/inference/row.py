"""Host-side bookkeeping of one generated sequence: its tokens, its text, when it finishes (EOS, a
stop string, its length), and what has been streamed. ``generate`` and the server share it."""

from __future__ import annotations

from mixtral_jax.inference.detokenize import IncrementalText


class Row:
  """Host-side state of one sequence: its tokens, its text, and what has been streamed.

  The text is kept incrementally (:class:`mixtral_jax.inference.detokenize.IncrementalText`) and stop
  strings are searched for only where new text could complete one, so a token costs O(1) in the
  length of the reply, not O(n)."""

  def __init__(self, index: int, tokenizer, eos: frozenset[int], stop: tuple[str, ...], stream):
    self.index, self.tokenizer, self.eos, self.stop, self.stream = index, tokenizer, eos, stop, stream
    self.tokens: list[int] = []
    self.decoder = IncrementalText(tokenizer, self.tokens) if tokenizer is not None else None
    self.text = ""
    self.searched = 0  # characters of self.text already searched for stop strings (none found)
    self.streamed = 0  # characters of self.text already passed to stream
    self.finish: str | None = None
    # Text that could be the start of a stop string is held back from the stream until resolved.
    self.holdback = max((len(s) for s in stop), default=1) - 1

  def push(self, token: int, is_last_step: bool) -> None:
    if token in self.eos:
      self._finish("eos", None)
      return
    self.tokens.append(token)
    if self.decoder is not None:
      text = self.decoder.text()
      # A byte-fallback token may end mid-character: wait for the rest before taking the text.
      if not text.endswith("\ufffd"):
        self.text = text
      for s in self.stop:  # a new occurrence ends in the new text, so starts at most len(s)-1 before it
        at = self.text.find(s, max(0, self.searched - len(s) + 1))
        if at >= 0:
          self.text = self.text[:at]
          self._finish("stop", token)
          return
      self.searched = len(self.text)
    if is_last_step:
      self._finish("length", token)
      return
    self._emit(token, self.text[self.streamed:max(self.streamed, len(self.text) - self.holdback)])

  def _finish(self, reason: str, token: int | None) -> None:
    self.finish = reason
    if reason == "length" and self.decoder is not None:
      self.text = self.decoder.text()  # a trailing partial character is final now
    self._emit(token, self.text[self.streamed:])

  def _emit(self, token: int | None, delta: str) -> None:
    self.streamed += len(delta)
    if self.stream is not None and (token is not None or delta):
      self.stream(self.index, token, delta)
