"""``mixtral-jax serve`` in a subprocess on 127.0.0.1, driven by the real ``openai`` client (and httpx for
raw SSE, disconnects and error bodies). Every answer is checked against ``generate`` on the same
weights in this process, one request alone.

The model is the tiny preset with the v3 vocabulary (32768, the bundled v3 tokenizer), random, with one
planted behaviour so tool calls can be tested: 23 hidden dimensions that only a chain of 23 tokens use
(their embeddings are one-hot there, every other embedding is zero there, and no layer writes there)
and an LM head that maps chain token i to chain token i+1. ``[/INST]`` starts the chain, which writes
``[TOOL_CALLS]`` and then a JSON call and EOS. Every other token behaves as in a random model.
"""

import concurrent.futures
import json
import re
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import mixtral_jax
from mixtral_jax.checkpoint import save
from mixtral_jax.chat import encode_chat
from mixtral_jax.generate import generate
from mixtral_jax.tokenizer import Tokenizer
from processes import serving

pytestmark = pytest.mark.subprocess_cli

NAME = "tiny-v3"
CONTEXT = 1024
CALL_PIECES = ['▁[', '{"', 'name', '":"', 'get', '_', 'we', 'ather', '","', 'arguments', '":', '▁{"', 'city', '"',
               ':', '▁"', 'Par', 'is', '"}', '}', ']']
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def planted_model(tok: Tokenizer):
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", vocab_size=32768), seed=3)
  chain = [tok.special_id("[/INST]"), tok.special_id("[TOOL_CALLS]")] + [tok._sp.piece_to_id(p) for p in CALL_PIECES]
  assert len(set(chain)) == len(chain) and 0 not in chain
  n = len(chain)
  embed = model.embed_VD[...].at[:, :n].set(0.0)
  embed = embed.at[jnp.array(chain), :n].set(4.0 * jnp.eye(n))
  head = model.head_DV[...].at[:n, :].set(0.0)
  head = head.at[jnp.arange(n), jnp.array(chain[1:] + [tok.eos_id])].set(1.0)
  model.embed_VD[...] = embed
  model.head_DV[...] = head
  model.blocks.attn.o_NHD[...] = model.blocks.attn.o_NHD[...].at[..., :n].set(0.0)
  model.blocks.moe.w2_EFD[...] = model.blocks.moe.w2_EFD[...].at[..., :n].set(0.0)
  return model


FLAGS = ("--max-batch", "4", "--max-queue", "4", "--max-context", str(CONTEXT), "--prefill-chunk", "32")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  tok = Tokenizer.load("v3")
  path = save(planted_model(tok), tmp_path_factory.mktemp("serve") / NAME)
  return path, mixtral_jax.from_pretrained(path), tok


@pytest.fixture(scope="module")
def server(saved):
  """The default server: the paged KV cache, sized on CPU as the fixed rows would be."""
  path, model, tok = saved
  with serving(path, *FLAGS) as url:
    yield url, model, tok


@pytest.fixture(scope="module")
def fixed_server(saved):
  """The same model on the opt-out fixed-row cache (``--fixed-rows``)."""
  path, model, tok = saved
  with serving(path, *FLAGS, "--fixed-rows") as url:
    yield url, model, tok


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)


def alone(model, tok, prompt, n, **kw):
  """``generate`` on one request alone: (text, tokens produced including an EOS, finish reason)."""
  out = generate(model, [prompt], n, tokenizer=tok, **kw)
  return out.texts[0], len(out.tokens[0]) + (out.finish_reasons[0] == "eos"), out.finish_reasons[0]


def metrics(url) -> dict[str, float]:
  text = httpx.get(f"{url}/metrics").text
  return {m[1]: float(m[2]) for m in re.finditer(r"^(mixtral_jax_\w+) ([-\d.e+]+)$", text, re.M)}


def test_models_health_metrics(server, client):
  url, _, _ = server
  assert [m.id for m in client.models.list().data] == [NAME]
  assert httpx.get(f"{url}/health").json()["status"] == "ok"
  names = metrics(url)
  for key in ("requests_total", "prompt_tokens_total", "generation_tokens_total", "queue_depth", "batch_occupancy",
              "time_to_first_token_seconds_count"):
    assert f"mixtral_jax_{key}" in names
  # Paged by default; on CPU the pool holds what 4 fixed rows of CONTEXT reserved: 4 x 1024 / 64 pages, one
  # of them the null page.
  assert names["mixtral_jax_kv_pages"] == 4 * CONTEXT // 64 - 1


def test_completion_matches_generate_with_usage(server, client):
  _, model, tok = server
  prompt = "def fibonacci(n):"
  r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
  text, produced, finish = alone(model, tok, prompt, 12)
  assert r.choices[0].text == text
  assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[finish]
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), produced)
  assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_and_stream(server, client):
  url, model, tok = server
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
  ids = encode_chat(messages, version="v3")
  text, produced, _ = alone(model, tok, ids, 40)
  r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0)
  assert r.choices[0].message.content == text and r.choices[0].message.tool_calls is None
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), produced)
  chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0,
                                               stream=True))
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
  assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
  assert chunks[-1].usage.completion_tokens == produced
  with httpx.stream("POST", f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 3,
                                                           "stream": True}) as s:
    lines = [line for line in s.iter_lines() if line]
  assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 3


def test_tool_calls(server, client):
  _, _, tok = server
  messages = [{"role": "user", "content": "Weather in Paris?"}]
  r = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, temperature=0)
  call = r.choices[0].message.tool_calls[0]
  assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
  assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
  assert r.usage.prompt_tokens == len(encode_chat(messages, TOOLS, version="v3"))
  chunks = list(client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, temperature=0,
                                               stream=True))
  calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
  assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
  assert chunks[-1].choices[0].finish_reason == "tool_calls"
  # The call goes back in as an assistant turn, its result as a tool turn.
  follow = messages + [r.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "22 C"}]
  r2 = client.chat.completions.create(model=NAME, messages=follow, tools=TOOLS, temperature=0, max_tokens=4)
  assert r2.usage.prompt_tokens == len(encode_chat(follow, TOOLS, version="v3"))


def test_stop_string(server, client):
  _, model, tok = server
  prompt = "import os\n"
  full = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
  stop = full[6:9]
  assert stop.strip(), full
  r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
  text, produced, _ = alone(model, tok, prompt, 24, stop=[stop])
  assert r.choices[0].text == text == full[:full.index(stop)]
  assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == produced


def test_concurrent_requests_equal_generate_alone(server, client):
  """8 requests of mixed lengths at once on 4 rows (prompts up to 3 prefill chunks), greedy and sampled.

  The greedy references come from one batched ``generate`` call (rows are independent there, and a
  greedy continuation's first k tokens do not depend on how many follow); the sampled ones alone, as
  the key of a sampled row depends on its index in the batch."""
  _, model, tok = server
  rng = np.random.RandomState(0)
  lengths, news = (5, 80, 17, 33, 2, 64, 9, 40), (12, 5, 20, 7, 30, 3, 16, 9)
  jobs = [(rng.randint(3, 30000, n).tolist(), k, 0.9 if i in (2, 6) else 0.0, 100 + i)
          for i, (n, k) in enumerate(zip(lengths, news))]

  def ask(job):
    prompt, k, temperature, seed = job
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=k, temperature=temperature, seed=seed)
    return r.choices[0].text, r.usage.completion_tokens

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(ask, jobs))
  greedy = [i for i, job in enumerate(jobs) if job[2] == 0]
  batch = generate(model, [jobs[i][0] for i in greedy], max(news), tokenizer=tok)
  for row, i in enumerate(greedy):
    k = news[i]
    tokens, finish = batch.tokens[row], batch.finish_reasons[row]
    want = (tok.decode(tokens[:k]), k) if len(tokens) >= k else (batch.texts[row], len(tokens) + (finish == "eos"))
    assert got[i] == want, f"request {i}"
  for i in (2, 6):
    text, produced, _ = alone(model, tok, jobs[i][0], news[i], temperature=0.9, seed=jobs[i][3])
    assert got[i] == (text, produced), f"request {i}"
  assert metrics(server[0])["mixtral_jax_batch_occupancy"] > 0.25


def test_fixed_rows_serve_and_refuse_what_needs_pages(fixed_server):
  """``--fixed-rows``: answers equal ``generate`` alone; logprobs and response_format are 400s naming the flag."""
  url, model, tok = fixed_server
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
  r = client.completions.create(model=NAME, prompt="def fibonacci(n):", max_tokens=12, temperature=0)
  assert r.choices[0].text == alone(model, tok, "def fibonacci(n):", 12)[0]
  assert "mixtral_jax_kv_pages" not in metrics(url)
  for extra in ({"logprobs": 2}, {"response_format": {"type": "json_object"}}):
    with pytest.raises(openai.BadRequestError) as e:
      client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body=extra)
    assert "not served with --fixed-rows" in e.value.message, e.value.message


def test_full_queue_429_and_disconnect_frees_rows(fixed_server):
  """On fixed rows (the paged engine counts a waiting request against ``--max-queue`` differently, see
  the report of the paged-default change)."""
  url = fixed_server[0]
  before = metrics(url)
  body = {"model": NAME, "prompt": [1, 300, 400], "max_tokens": CONTEXT - 3, "temperature": 0, "stream": True}
  with httpx.Client(timeout=30) as h:
    streams = [h.stream("POST", f"{url}/v1/completions", json=body) for _ in range(8)]
    responses = [s.__enter__() for s in streams]
    lines = [r.iter_lines() for r in responses]  # kept: a dropped iterator closes its connection
    for it in lines[:4]:  # the 4 rows are generating
      assert next(it).startswith("data: ")
    m = metrics(url)
    assert (m["mixtral_jax_batch_rows_busy"], m["mixtral_jax_queue_depth"]) == (4, 4)
    full = h.post(f"{url}/v1/completions", json=dict(body, stream=False))
    assert full.status_code == 429 and full.headers["Retry-After"]
    assert full.json()["error"]["code"] == "queue_full"
    for s in streams:
      s.__exit__(None, None, None)
  deadline = time.time() + 10
  while (m := metrics(url))["mixtral_jax_batch_rows_busy"] or m["mixtral_jax_queue_depth"]:
    assert time.time() < deadline, m
    time.sleep(0.1)
  # All 8 ended early: the 4 queued never ran, the 4 running stopped well short of max_tokens.
  assert m["mixtral_jax_requests_total"] - before["mixtral_jax_requests_total"] == 8
  assert m["mixtral_jax_generation_tokens_total"] - before["mixtral_jax_generation_tokens_total"] < 4 * (CONTEXT - 3)


def test_errors(server, client):
  url = server[0]
  bad = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "tiny-v3", "messages": [',
                   headers={"Content-Type": "application/json"})
  assert bad.status_code == 400
  assert set(bad.json()["error"]) >= {"message", "type", "param", "code"} and "JSON" in bad.json()["error"]["message"]
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=NAME, prompt=[5] * (CONTEXT + 10), max_tokens=4)
  assert str(CONTEXT + 10) in e.value.message and str(CONTEXT) in e.value.message
  with pytest.raises(openai.NotFoundError) as e:
    client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
  assert "gpt-4" in e.value.message and NAME in e.value.message
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model=NAME, prompt="x", top_p=1.5)
