"""Incremental detokenization (``mixtral_jax.inference.detokenize``, used by generate's and the server's
rows) against decoding the whole token list after every token, on random token streams with the real
v1 and v3 tokenizers: byte-fallback multi-byte characters (whole, cut short, invalid), control and
unknown tokens, leading spaces, and stop strings that span tokens."""

import random

import pytest

from mixtral_jax.inference.row import Row
from mixtral_jax.inference.detokenize import IncrementalText
from mixtral_jax.tokenizer import Tokenizer

TEXTS = ["naïve café — 10€ über straße", "数学 是 科学的 语言 😀👍🏽", "Привет, мир! ¿Qué tal?",
         "  def f(x):\n\treturn x"]


class FullRedecodeRow:
  """The reference: the row as it was before incremental decoding, re-decoding everything per token."""

  def __init__(self, tokenizer, eos, stop, stream):
    self.tokenizer, self.eos, self.stop, self.stream = tokenizer, eos, stop, stream
    self.tokens, self.text, self.streamed, self.finish = [], "", 0, None
    self.holdback = max((len(s) for s in stop), default=1) - 1

  def push(self, token, is_last_step):
    if token in self.eos:
      return self._finish("eos", None)
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens)
    if not text.endswith("\ufffd"):
      self.text = text
    for s in self.stop:
      at = self.text.find(s)
      if at >= 0:
        self.text = self.text[:at]
        return self._finish("stop", token)
    if is_last_step:
      return self._finish("length", token)
    self._emit(token, self.text[self.streamed:max(self.streamed, len(self.text) - self.holdback)])

  def _finish(self, reason, token):
    self.finish = reason
    if reason == "length":
      self.text = self.tokenizer.decode(self.tokens)
    self._emit(token, self.text[self.streamed:])

  def _emit(self, token, delta):
    self.streamed += len(delta)
    if token is not None or delta:
      self.stream(0, token, delta)


@pytest.fixture(scope="module", params=["v1", "v3"])
def tok(request):
  return Tokenizer.load(request.param)


def byte_ids(tok, data: bytes):
  return [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in data]


def random_stream(tok, rng: random.Random, n: int) -> list[int]:
  """Pieces mixed the way a sampled model could emit them."""
  control = sorted(tok._control)
  out = []
  while len(out) < n:
    kind = rng.random()
    if kind < 0.35:
      out += [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 4))]
    elif kind < 0.55:  # real text, multi-byte characters through byte fallback
      text = rng.choice(TEXTS)
      a = rng.randrange(len(text))
      out += tok.encode(text[a:a + rng.randint(1, 12)], bos=False)
    elif kind < 0.7:  # UTF-8 bytes of a character: whole, cut short, or a stray continuation byte
      data = rng.choice("é€😀数ß👍").encode()
      data = data[:rng.randint(1, len(data))] if rng.random() < 0.3 else data
      out += byte_ids(tok, data if rng.random() < 0.9 else b"\x82")
    elif kind < 0.8:
      out.append(rng.choice(control))
    elif kind < 0.85:
      out.append(tok._sp.unk_id())
    else:
      out += [tok._sp.piece_to_id(p) for p in rng.choice([["▁"], ["▁", "▁"], ["<0x20>"], ["▁▁"]])]
  return out[:n]


def test_incremental_text_equals_full_decode(tok):
  rng = random.Random(0)
  for _ in range(300):
    tokens = []
    inc = IncrementalText(tok, tokens)
    for t in random_stream(tok, rng, rng.randint(1, 40)):
      tokens.append(t)
      assert inc.text() == tok.decode(tokens), tokens


def run(row_cls, tok, tokens, eos, stop, last):
  calls = []
  row = row_cls(tok, eos, stop, lambda *a: calls.append(a))
  for i, t in enumerate(tokens):
    row.push(t, is_last_step=i + 1 == last)
    if row.finish is not None:
      break
  return calls, row.text, row.finish, row.tokens


def test_rows_stream_and_stop_exactly_as_full_redecoding(tok):
  """Stop strings are cut from the reference's own text at random places (so they span tokens and
  characters); every stream call, the final text and the finish reason must be the same."""
  rng = random.Random(1)
  new_row = lambda tok, eos, stop, stream: Row(0, tok, eos, stop, stream)  # noqa: E731
  stopped = 0
  for i in range(400):
    tokens = random_stream(tok, rng, rng.randint(1, 60))
    full = tok.decode(tokens)
    stop = []
    for _ in range(rng.randint(0, 3)):
      if full:
        a = rng.randrange(len(full))
        stop.append(full[a:a + rng.randint(1, 6)])
    if rng.random() < 0.2:
      stop.append("never appears ✓")
    eos = frozenset([tok.eos_id]) if rng.random() < 0.5 else frozenset()
    last = rng.randint(1, len(tokens) + 3)
    ref = run(FullRedecodeRow, tok, tokens, eos, tuple(stop), last)
    assert run(new_row, tok, tokens, eos, tuple(stop), last) == ref, (tokens, stop)
    stopped += ref[2] == "stop"
  assert stopped > 100  # the stop strings did fire
