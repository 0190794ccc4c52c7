"""The server's bad inputs (issue 23, items 6-7), in process through FastAPI's TestClient: undecodable
text (a lone surrogate in JSON, bytes that are not UTF-8) and non-finite numbers are 400s with OpenAI's
error body naming the parameter; ``top_k: -1`` is refused; a prompt over the context names ``prompt``
on /v1/completions and ``messages`` on chat, without echoing the prompt. The engine is never started:
every case is refused before a request reaches it (a 500 or a hang would show otherwise)."""

import pytest
from fastapi.testclient import TestClient

import mixtral_jax
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.server import build_app
from mixtral_jax.tokenizer import Tokenizer

CONTEXT = 32


@pytest.fixture(scope="module")
def client():
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", num_hidden_layers=1), seed=0)
  engine = Engine(model, Tokenizer.load("v1"), max_batch=2, max_context=CONTEXT, max_queue=2)
  with TestClient(build_app(engine, engine.tokenizer, "tiny", "v1"), raise_server_exceptions=False) as c:
    yield c
  assert engine.busy_rows() == 0 and engine.queue_depth() == 0


def _error(response, status, param, code=None):
  assert response.status_code == status, response.text
  body = response.json()
  assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
  assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param, body
  if code:
    assert body["error"]["code"] == code, body
  return body["error"]["message"]


def _post(client, route, raw: bytes):
  return client.post(route, content=raw, headers={"Content-Type": "application/json"})


def test_lone_surrogate_is_a_400_naming_the_parameter(client):
  message = _error(_post(client, "/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}'), 400, "prompt",
                   "invalid_text")
  assert "lone surrogate U+D800" in message
  chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\udfff"}]}'
  assert "U+DFFF" in _error(_post(client, "/v1/chat/completions", chat), 400, "messages", "invalid_text")


def test_body_that_is_not_utf8_is_a_400(client):
  raw = '{"model": "tiny", "prompt": "café"}'.encode("latin-1")
  _error(_post(client, "/v1/completions", raw), 400, None, "invalid_json")


@pytest.mark.parametrize("field, value", [("temperature", "NaN"), ("temperature", "Infinity"),
                                          ("top_p", "NaN"), ("top_k", "-1"), ("top_k", "1.5")])
def test_non_finite_or_negative_sampling_is_a_400(client, field, value):
  raw = f'{{"model": "tiny", "prompt": "hi", "{field}": {value}}}'.encode()
  _error(_post(client, "/v1/completions", raw), 400, field)


def test_prompt_over_the_context_names_the_right_parameter_without_echoing_it(client):
  long_text = "the quick brown fox jumps over the lazy dog " * 10
  r = client.post("/v1/completions", json={"model": "tiny", "prompt": long_text})
  message = _error(r, 400, "prompt", "context_length_exceeded")
  assert "quick brown" not in message and f"the context is {CONTEXT} tokens" in message
  r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": long_text}]})
  assert "quick brown" not in _error(r, 400, "messages", "context_length_exceeded")
