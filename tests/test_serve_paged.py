"""``mixtral-jax serve --kv-cache-gib`` (the paged KV cache) in a subprocess, driven by the real
``openai`` client: answers equal ``generate`` on the same weights, one request alone, also for
concurrent requests that share a long prompt prefix (reused from the prefix cache, seen in /metrics)."""

import concurrent.futures

import httpx
import numpy as np
import openai
import pytest

import mixtral_jax
from mixtral_jax.checkpoint import save
from mixtral_jax.generate import generate
from mixtral_jax.tokenizer import Tokenizer
from processes import serving
from test_serve import metrics

NAME = "tiny-paged"
CONTEXT, PAGE = 512, 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  tok = Tokenizer.load("v1")
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", vocab_size=32000), seed=4)
  path = save(model, tmp_path_factory.mktemp("serve") / NAME)
  cfg = model.cfg
  per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * 4  # float32 K and V
  gib = 80 * PAGE * per_token / 2**30  # 80 pages: more than one 512-token request, fewer than 4 x 512
  model = mixtral_jax.from_pretrained(path, dtype="float32")
  with serving(path, "--max-batch", "4", "--max-context", str(CONTEXT), "--prefill-chunk", "64",
               "--kv-cache-gib", f"{gib:.9f}", "--page-size", str(PAGE), "--dtype", "float32") as url:
    yield url, model, tok


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)


@pytest.mark.slow
def test_paged_completions_equal_generate_and_reuse_the_prefix(server, client):
  url, model, tok = server
  system = "You are a careful assistant. " * 12  # full pages shared by every request
  prompts = [system + q for q in ("Name a prime.", "Count to three.", "Say hi.", "What is 2 + 2?")]
  first = client.completions.create(model=NAME, prompt=prompts[0], max_tokens=10, temperature=0)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    rest = list(pool.map(lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0),
                         prompts[1:]))
  for p, r in zip(prompts, [first] + rest):
    want = generate(model, [p], 10, tokenizer=tok)
    assert r.choices[0].text == want.texts[0]
  encoded = [tok.encode(p) for p in prompts]
  common = next(i for i in range(min(map(len, encoded))) if len({e[i] for e in encoded}) > 1)
  m = metrics(url)
  assert common >= 4 * PAGE and m["mixtral_jax_prefix_cache_hit_tokens_total"] == 3 * (common // PAGE) * PAGE
  assert 0 < m["mixtral_jax_prefix_cache_hit_rate"] < 1 and CONTEXT // PAGE <= m["mixtral_jax_kv_pages"] <= 79


@pytest.mark.slow
def test_paged_chat_stream_equals_generate(server, client):
  _, model, tok = server
  from mixtral_jax.chat import encode_chat
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  want = generate(model, [encode_chat(messages, version="v1")], 16, tokenizer=tok).texts[0]
  chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                               stream=True))
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def _log_softmax(logits):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.slow
def test_logprobs_equal_the_models_log_softmax(server, client):
  """Chat logprobs/top_logprobs and completions logprobs (streamed too) are the log-softmax of the
  model's logits at each generated position (our forward equals transformers' within 1e-4:
  tests/test_logprobs.py), in the openai client's types."""
  url, model, tok = server
  prompt = "The quick brown fox"
  ids = tok.encode(prompt)
  r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
  gen = tok.encode(prompt, bos=True) + [int(t) for t in generate(model, [prompt], 6, tokenizer=tok).tokens[0]]
  logp = _log_softmax(np.asarray(model(np.asarray([gen], np.int32)))[0])
  lp = r.choices[0].logprobs
  assert len(lp.token_logprobs) == 6 and all(len(t) == 3 for t in lp.top_logprobs)
  for i, got in enumerate(lp.token_logprobs):
    pos = len(ids) - 1 + i
    assert abs(got - logp[pos, gen[pos + 1]]) < 1e-4
    assert abs(max(lp.top_logprobs[i].values()) - logp[pos].max()) < 1e-4
  chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                          stream=True))
  streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
  np.testing.assert_allclose(streamed, lp.token_logprobs, atol=1e-6)
  chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                        temperature=0, logprobs=True, top_logprobs=2)
  content = chat.choices[0].logprobs.content
  assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
  assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)  # greedy: the top one


@pytest.mark.slow
def test_top_logprobs_above_the_limit_is_400(server):
  url, _, _ = server
  r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                                     "logprobs": True, "top_logprobs": 21})
  assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_response_format_json_schema_validates(server, client):
  """A random model constrained by a schema answers JSON that validates, on both routes."""
  import json

  import jsonschema
  schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                             "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                             "ok": {"type": "boolean"}},
            "required": ["city", "n", "ok"], "additionalProperties": False}
  fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
  chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Where?"}], max_tokens=60,
                                        temperature=0, response_format=fmt)
  jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
  assert chat.choices[0].finish_reason == "stop"
  comp = client.completions.create(model=NAME, prompt="Answer:", max_tokens=60, temperature=0.7, seed=3,
                                   extra_body={"response_format": fmt})
  jsonschema.validate(json.loads(comp.choices[0].text), schema)


def test_a_schema_the_engine_cannot_compile_is_400_with_its_reason(server):
  url, _, _ = server
  bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}
  r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                                     "response_format": bad})
  assert r.status_code == 400 and "look-around" in r.json()["error"]["message"]
