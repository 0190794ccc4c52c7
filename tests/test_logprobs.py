"""logprobs (mixtral_jax.inference.logprobs): the numbers against transformers' log-softmax on the same
weights and a float64 NumPy recomputation; the JSON against the ``openai`` client's own response types;
the request fields and their limits."""

import jax
import numpy as np
import pytest
from openai.types import completion_choice
from openai.types.chat import ChatCompletion, ChatCompletionTokenLogprob

import mixtral_jax
from mixtral_jax.inference.logprobs import (MAX_TOP_LOGPROBS, LogprobsError, TokenLogprobs, chat_logprobs,
                                            completion_logprobs, requested_top, rows_to_host, text_length,
                                            token_logprobs)
from mixtral_jax.inference.pieces import vocabulary_bytes
from mixtral_jax.tokenizer import Tokenizer
from reference import hf_logits, hf_model, save_hf


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_numbers_equal_float64_log_softmax_and_top_k():
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((4, 1000)) * 5).astype(np.float32)
  logits[2, [7, 9]] = 50.0  # a tie: the lower id first
  tokens = rng.integers(0, 1000, 4).astype(np.int32)
  chosen, ids, top = jax.jit(token_logprobs, static_argnums=2)(logits, tokens, 5)
  ref = _log_softmax64(logits)
  np.testing.assert_allclose(np.asarray(chosen), ref[np.arange(4), tokens], atol=1e-5)
  want_ids = np.argsort(-ref, axis=-1, kind="stable")[:, :5]
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_allclose(np.asarray(top), np.take_along_axis(ref, want_ids, -1), atol=1e-5)
  assert list(np.asarray(ids)[2, :2]) == [7, 9]


@pytest.mark.slow
def test_model_logprobs_equal_transformers_log_softmax(tmp_path):
  """On the same weights, our logits through token_logprobs equal torch.log_softmax of transformers'
  logits within 1e-4 (the issue's fidelity target), chosen token and top 20."""
  import torch

  hf = hf_model(seed=3)
  model = mixtral_jax.from_pretrained(save_hf(hf, tmp_path / "hf"), param_dtype="float32")
  ids = np.random.default_rng(1).integers(1, 1000, (2, 12)).astype(np.int32)
  want = torch.log_softmax(torch.tensor(hf_logits(hf, ids)[0], dtype=torch.float64), -1).numpy()
  logits = np.asarray(model(ids))
  B, T, V = logits.shape
  flat = logits.reshape(B * T, V)
  next_ids = np.roll(ids, -1, 1).reshape(-1)
  chosen, top_ids, top = token_logprobs(flat, next_ids, MAX_TOP_LOGPROBS)
  want_flat = want.reshape(B * T, V)
  np.testing.assert_allclose(np.asarray(chosen), want_flat[np.arange(B * T), next_ids], atol=1e-4)
  np.testing.assert_allclose(np.asarray(top), np.take_along_axis(want_flat, np.asarray(top_ids), -1), atol=1e-4)
  np.testing.assert_allclose(np.asarray(top)[:, 0], want_flat.max(-1), atol=1e-4)


def _entries(k):
  rng = np.random.default_rng(2)
  vocab = vocabulary_bytes(Tokenizer.load("v1").path)
  ids = [22557, 28725, 1526, 28808, 2, 243]  # " Hello", ",", " world", "!", </s>, the byte 0xF0
  entries = []
  for t in ids:
    top_ids = rng.integers(0, 32000, k)
    entries.append(TokenLogprobs(t, float(-rng.random()), top_ids, -np.sort(rng.random(k))))
  return entries, vocab


def test_chat_format_is_what_the_openai_client_reads():
  entries, vocab = _entries(3)
  lp = chat_logprobs(entries, vocab)
  for e in lp["content"]:
    ChatCompletionTokenLogprob.model_validate(e)
  first = lp["content"][0]
  assert first["token"] == " Hello" and bytes(first["bytes"]).decode() == " Hello" and len(first["top_logprobs"]) == 3
  assert lp["content"][1]["token"] == "," and lp["content"][2]["token"] == " world"
  assert lp["content"][4]["token"] == "</s>" and lp["content"][5]["bytes"] == [0xF0]
  assert lp["content"][5]["token"] == "\ufffd"
  body = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "finish_reason": "stop", "logprobs": lp,
                       "message": {"role": "assistant", "content": "Hello, world!"}}]}
  parsed = ChatCompletion.model_validate(body)
  assert parsed.choices[0].logprobs.content[2].top_logprobs[0].logprob == entries[2].top_logprobs[0]


def test_completions_format_and_stream_chunks_add_up():
  entries, vocab = _entries(2)
  whole = completion_logprobs(entries, vocab)
  completion_choice.Logprobs.model_validate(whole)
  assert whole["tokens"][:3] == [" Hello", ",", " world"] and whole["text_offset"][:4] == [0, 6, 7, 13]
  assert all(len(t) <= 2 for t in whole["top_logprobs"])
  # Streamed in chunks of 1, 2 and 3 tokens, with the running offset, the pieces add up to the whole.
  parts, offset = [], 0
  for lo, hi in [(0, 1), (1, 3), (3, 6)]:
    part = completion_logprobs(entries[lo:hi], vocab, offset)
    completion_choice.Logprobs.model_validate(part)
    parts.append(part)
    offset += text_length(entries[lo:hi], vocab)
  for key in whole:
    assert sum((p[key] for p in parts), []) == whole[key], key


def test_rows_to_host_cuts_each_row_to_its_k():
  chosen, ids, top = token_logprobs(np.random.default_rng(3).standard_normal((3, 50)).astype(np.float32),
                                    np.array([1, 2, 3], np.int32), 5)
  rows = rows_to_host(chosen, ids, top, np.array([1, 2, 3]), [0, None, 4])
  assert rows[1] is None and len(rows[0].top_ids) == 0 and len(rows[2].top_logprobs) == 4
  assert rows[2].token == 3 and rows[2].logprob == pytest.approx(float(chosen[2]))


@pytest.mark.parametrize("body,route,want", [
    ({}, "chat", None), ({"logprobs": False}, "chat", None), ({"logprobs": True}, "chat", 0),
    ({"logprobs": True, "top_logprobs": 20}, "chat", 20), ({"logprobs": True, "top_logprobs": 0}, "chat", 0),
    ({}, "completions", None), ({"logprobs": None}, "completions", None), ({"logprobs": 0}, "completions", 0),
    ({"logprobs": 5}, "completions", 5),
])
def test_requested_top(body, route, want):
  assert requested_top(body, route) == want


@pytest.mark.parametrize("body,route,param,msg", [
    ({"logprobs": True, "top_logprobs": 21}, "chat", "top_logprobs", r"in \[0, 20\], got 21"),
    ({"logprobs": True, "top_logprobs": -1}, "chat", "top_logprobs", "got -1"),
    ({"top_logprobs": 3}, "chat", "top_logprobs", "needs 'logprobs': true"),
    ({"logprobs": 3}, "chat", "logprobs", "must be a boolean"),
    ({"logprobs": 21}, "completions", "logprobs", r"in \[0, 20\], got 21"),
    ({"logprobs": True}, "completions", "logprobs", "must be an integer"),
    ({"logprobs": 2.0}, "completions", "logprobs", "must be an integer"),
])
def test_bad_requests_name_the_field(body, route, param, msg):
  with pytest.raises(LogprobsError, match=msg) as e:
    requested_top(body, route)
  assert e.value.param == param
