"""Structured output (mixtral_jax.inference.grammar) with the real v1 tokenizer.

Sampling from random logits under the masks must give text that parses with ``json`` and validates
with ``jsonschema`` (the independent references) for 50 random schemas; the device-side unpacking of
the bitmask equals NumPy's ``unpackbits`` and llguidance's own NumPy masking; bad formats raise
GrammarError with the engine's reason.
"""

import functools
import json
import random

import jax
import jsonschema
import llguidance.numpy as llg_np
import numpy as np
import pytest
import sentencepiece

from mixtral_jax.inference.grammar import (GrammarError, MaskBatch, StructuredOutput, allowed, apply_bitmask,
                                           consume, schema_of)
from mixtral_jax.inference.pieces import piece_bytes
from mixtral_jax.tokenizer import Tokenizer

NAMES = ["id", "name", "tags", "score", "ok", "kind", "items", "meta", "x", "city"]


@functools.lru_cache
def _so():
  return StructuredOutput(Tokenizer.load("v1"))


@functools.lru_cache
def _pieces():
  return piece_bytes(sentencepiece.SentencePieceProcessor(model_file=_so().tokenizer.path))


def random_schema(rng: random.Random, depth: int = 0) -> dict:
  """Nested objects, arrays, enums, bounded integers, numbers, booleans, short strings. Strings have a
  maxLength and objects no extra keys, so sampling from random logits ends in a few dozen tokens."""
  kinds = ["string", "integer", "number", "boolean", "enum", "null"] + (["object", "array"] * 2 if depth < 2 else [])
  kind = rng.choice(kinds) if depth else "object"
  if kind == "object":
    names = rng.sample(NAMES, rng.randint(1, 4))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": rng.sample(names, rng.randint(0, len(names))), "additionalProperties": False}
  if kind == "array":
    lo = rng.randint(0, 2)
    return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
  if kind == "string":
    return {"type": "string", "maxLength": rng.randint(1, 6)}
  if kind == "integer":
    lo = rng.randint(-100, 100)
    return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
  if kind == "enum":
    return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
  return {"type": kind}


def unpack(bits, V):
  return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :V].astype(bool)


def sample_constrained(so, grammar, rng: np.random.Generator, max_tokens=200, close_bias=0.0):
  """Random-logit sampling under the masks until EOS; returns the generated token ids (EOS excluded)."""
  tok = so.tokenizer
  matcher = so.matcher(grammar)
  masks = MaskBatch(1, so.vocab_size)
  closing = np.array([any(c in p for c in (b"}", b"]", b'"')) for p in _pieces()]) if close_bias else 0
  out = []
  for _ in range(max_tokens):
    ok = unpack(masks.fill([matcher]), tok.vocab_size)[0]
    assert ok.any(), "the mask allows no token"
    logits = rng.standard_normal(tok.vocab_size) * 3 + close_bias * closing
    token = int(np.argmax(np.where(ok, logits, -np.inf)))
    if token == tok.eos_id:
      assert matcher.is_accepting()
      return out
    consume(matcher, token)
    out.append(token)
  raise AssertionError(f"no EOS after {max_tokens} tokens: {tok.decode(out)!r}")


def test_fifty_random_schemas_parse_and_validate():
  so, rng, nrng = _so(), random.Random(0), np.random.default_rng(0)
  lengths = []
  for i in range(50):
    schema = random_schema(rng)
    grammar = so.compile({"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
    ids = sample_constrained(so, grammar, nrng)
    text = so.tokenizer.decode(ids)
    value = json.loads(text)
    jsonschema.validate(value, schema)
    lengths.append(len(ids))
  assert max(lengths) > 5  # not vacuous: real objects were produced


def test_json_object_gives_an_object():
  so, nrng = _so(), np.random.default_rng(1)
  grammar = so.compile({"type": "json_object"})
  for _ in range(5):
    value = json.loads(so.tokenizer.decode(sample_constrained(so, grammar, nrng, max_tokens=300, close_bias=6.0)))
    assert isinstance(value, dict)


def test_first_mask_allows_only_an_object_start():
  so = _so()
  bits = MaskBatch(2, so.vocab_size).fill([so.matcher(so.compile({"type": "json_object"})), None])
  ok = unpack(bits, so.vocab_size)
  assert ok[1].all(), "an unconstrained row allows every token"
  pieces = _pieces()
  assert ok[0].sum() > 0 and all(pieces[i].lstrip().startswith(b"{") for i in np.nonzero(ok[0])[0])
  assert not ok[0][so.tokenizer.eos_id]


def test_device_unpacking_equals_numpy_and_llguidance():
  rng = np.random.default_rng(2)
  V = 32000
  bits = rng.integers(-2**31, 2**31, size=(3, (V + 31) // 32), dtype=np.int64).astype(np.int32)
  want = unpack(bits, V)
  np.testing.assert_array_equal(np.asarray(jax.jit(allowed, static_argnums=1)(bits, V)), want)
  logits = rng.standard_normal((3, V)).astype(np.float32)
  ref = logits.copy()
  llg_np.apply_token_bitmask_inplace(ref, bits)  # llguidance's own NumPy masking
  np.testing.assert_array_equal(np.asarray(jax.jit(apply_bitmask)(logits, bits)), ref)


def test_parallel_fill_equals_one_by_one():
  import llguidance
  so = _so()
  grammars = [so.compile({"type": "json_schema", "json_schema": {"schema": random_schema(random.Random(s))}})
              for s in range(4)]
  ms = [so.matcher(g) for g in grammars]
  for m in ms:  # move each a few tokens in
    for _ in range(3):
      ok = np.nonzero(unpack(MaskBatch(1, so.vocab_size).fill([m]), so.vocab_size)[0])[0]
      consume(m, int(ok[len(ok) // 2]))
  one = MaskBatch(5, so.vocab_size).fill(ms + [None]).copy()
  par = MaskBatch(5, so.vocab_size, llguidance.LLExecutor(2)).fill(ms + [None])
  np.testing.assert_array_equal(one, par)


def test_text_and_absent_are_unconstrained():
  assert schema_of(None) is None and schema_of({"type": "text"}) is None
  assert _so().compile({"type": "text"}) is None


@pytest.mark.parametrize("fmt,reason", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(?<=a)b"}}}, "look-around"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}, "frobnicate"),
    ({"type": "yaml"}, "'json_object' or 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "must be an object with a 'schema'"),
    ("json", "must be an object with a 'type'"),
])
def test_bad_formats_raise_with_the_engines_reason(fmt, reason):
  with pytest.raises(GrammarError, match=reason.replace("(", r"\(").replace("?", r"\?")):
    _so().compile(fmt)


def test_sampling_outside_the_mask_is_a_bug():
  so = _so()
  m = so.matcher(so.compile({"type": "json_object"}))
  with pytest.raises(RuntimeError, match="outside the grammar mask"):
    consume(m, so.tokenizer.encode("hello", bos=False)[0])
