"""Structured output: OpenAI's ``response_format`` as per-step token masks over our real vocabulary.

The grammar engine is llguidance (PyPI ``llguidance``; no dependencies, no torch). Per tokenizer, once
(about 0.3 s for 32k pieces): every sentencepiece piece becomes the bytes it stands for
(:mod:`mixtral_jax.inference.pieces`), and llguidance builds its token trie from them. Per request: ``response_format`` ->

  * ``{"type": "text"}`` or absent: no constraint;
  * ``{"type": "json_object"}``: any JSON object (the schema ``{"type": "object"}``);
  * ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: that schema;

compiled to an llguidance grammar (compact JSON: no free whitespace, so a model cannot pad forever),
validated (:class:`GrammarError` carries llguidance's reason; the server answers 400), and a matcher
that follows the sampled tokens. Each step, :meth:`MaskBatch.fill` writes every constrained row's
allowed tokens as a bitmask ``int32 [B, ceil(V / 32)]`` (bit v % 32 of word v // 32; unconstrained
rows all ones), and :func:`apply_bitmask` sets the logits of disallowed tokens to -inf on device before
sampling. EOS is allowed exactly when the output so far is complete.

Overlap: the mask for step t+1 needs only the token of step t, not the logits of step t+1, so the
engine dispatches step t+1's forward (JAX runs it asynchronously), fills the masks on the host
meanwhile, and then samples with them.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import llguidance
import llguidance.numpy as llg_np
import numpy as np
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from mixtral_jax.inference.pieces import SPECIAL_MARK, piece_bytes

# No free whitespace between JSON tokens: random or weak models otherwise emit whitespace until
# max_tokens, and the compact form is what json.dumps(separators=(",", ":")) writes.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
  """A response_format the grammar engine cannot compile; the message carries the engine's reason."""


def schema_of(response_format: Any) -> dict | None:
  """The JSON schema an OpenAI ``response_format`` asks for (None for plain text)."""
  if response_format is None:
    return None
  if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
    raise GrammarError(f"'response_format' must be an object with a 'type', got {response_format!r:.80}")
  kind = response_format["type"]
  if kind == "text":
    return None
  if kind == "json_object":
    return {"type": "object"}
  if kind == "json_schema":
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
      raise GrammarError("'response_format.json_schema' must be an object with a 'schema' object "
                         "({'name': ..., 'schema': {...}})")
    schema = spec.get("schema", {})
    return {} if schema is True else schema
  raise GrammarError(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}")


class _SentencePieceForLlguidance:
  """What ``llguidance.TokenizerWrapper`` reads: the token bytes, BOS/EOS, specials and an encoder.

  The encoder must give tokens for exactly the bytes it is handed: the model's own encoder adds
  sentencepiece's dummy-prefix space ("null" -> "▁null"), which makes llguidance panic on some
  grammars, so it runs a copy of the model with ``add_dummy_prefix`` off (what the model emits after
  a prompt is a continuation, which has no such prefix either).
  """

  def __init__(self, model_file: str):
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
      proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    self.tokens = piece_bytes(self._sp)
    self.eos_token_id, self.bos_token_id = self._sp.eos_id(), self._sp.bos_id()
    self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(SPECIAL_MARK)]

  def __call__(self, text):
    return self._sp.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(model_file: str) -> llguidance.LLTokenizer:
  return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceForLlguidance(model_file)))


class StructuredOutput:
  """Compiles response formats and makes matchers for one tokenizer (a :class:`mixtral_jax.tokenizer.
  Tokenizer`)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.ll = _ll_tokenizer(tokenizer.path)
    self.vocab_size = self.ll.vocab_size

  def compile(self, response_format: Any) -> str | None:
    """The grammar for ``response_format`` (None for text); GrammarError when it cannot compile."""
    schema = schema_of(response_format)
    if schema is None:
      return None
    try:
      grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:
      raise GrammarError(f"the JSON schema cannot be compiled: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
    if is_error:
      raise GrammarError(f"the JSON schema cannot be compiled: {messages[0].strip()}")
    return grammar

  def matcher(self, grammar: str) -> llguidance.LLMatcher:
    """A fresh matcher at the start of the output."""
    m = llguidance.LLMatcher(self.ll, grammar, log_level=0)
    if m.is_error():
      raise GrammarError(f"the JSON schema cannot be compiled: {m.get_error()}")
    return m


class MaskBatch:
  """The host bitmask ``int32 [B, ceil(V / 32)]`` of one decode batch, refilled every step."""

  def __init__(self, batch: int, vocab_size: int, executor: llguidance.LLExecutor | None = None):
    self.bits = llg_np.allocate_token_bitmask(batch, vocab_size)
    self.vocab_size = vocab_size
    self.executor = executor

  def fill(self, matchers: list) -> np.ndarray:
    """Row b: the tokens ``matchers[b]`` allows next; all tokens where it is None. Returns the bits."""
    self.bits[:] = -1
    live = [(m, b) for b, m in enumerate(matchers) if m is not None]
    if self.executor is not None and len(live) > 1:
      llg_np.fill_next_token_bitmask_par(self.executor, live, self.bits)
    else:
      for m, b in live:
        llg_np.fill_next_token_bitmask(m, self.bits, b)
    for m, b in live:  # an engine-internal failure would otherwise show up only as "EOS only"
      if m.is_error():
        raise RuntimeError(f"the grammar engine failed on row {b}: {m.get_error().splitlines()[0]}")
    return self.bits


def consume(matcher: llguidance.LLMatcher, token: int) -> None:
  """Advances a matcher by the sampled token; a token outside the mask is a bug, so it raises."""
  if not matcher.consume_token(int(token)):
    raise RuntimeError(f"token {token} was sampled outside the grammar mask: {matcher.get_error()}")


def allowed(bits_BW: jax.Array, vocab_size: int) -> jax.Array:
  """Boolean ``[B, V]`` from the packed bits: token v is allowed when bit v % 32 of word v // 32 is 1."""
  v_V = jnp.arange(vocab_size, dtype=jnp.int32)
  words_BV = jnp.take(bits_BW, v_V // 32, axis=1)
  return (jax.lax.shift_right_logical(words_BV, jnp.broadcast_to(v_V % 32, words_BV.shape)) & 1).astype(bool)


def apply_bitmask(logits_BV: jax.Array, bits_BW: jax.Array) -> jax.Array:
  """``logits_BV`` with the tokens outside each row's mask at -inf (run before sampling)."""
  return jnp.where(allowed(bits_BW, logits_BV.shape[-1]), logits_BV, -jnp.inf)


def dumps_compact(value: Any) -> str:
  """JSON as the compact grammar writes it (for tests and examples)."""
  return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
