"""A bounded server soak on loopback (issue 23, item 6): 32 clients for SOAK_S seconds against one
in-process ``uvicorn`` server over a started engine (4 rows, so requests queue and rows are reused).

Each client cycles through five kinds of request: a completion, a streamed completion, a chat
completion, a stream it drops after the first chunk, and a completion it abandons after 50 ms. Every
request is greedy. Reference: serial ``generate`` on the same model, one prompt alone. Pass: no
unexpected status or exception, every finished answer equal to that reference, and once the clients
are done, every batch row free and nothing queued."""

import concurrent.futures
import json
import random
import threading
import time

import httpx
import pytest
import uvicorn

import mixtral_jax
from mixtral_jax.chat import encode_chat
from mixtral_jax.generate import generate
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.server import build_app
from mixtral_jax.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

CLIENTS, SOAK_S, MAX_TOKENS = 32, 30.0, 6
PROMPTS = ["def fibonacci(n):", "The capital of France is", "Once upon a time", "import numpy as np\n",
           "Dear Sir or Madam,", "The mixture of experts"]


@pytest.fixture(scope="module")
def served(free_port):
  tok = Tokenizer.load("v1")
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", num_hidden_layers=1), seed=5)
  expected = {p: generate(model, [p], MAX_TOKENS, tokenizer=tok).texts[0] for p in PROMPTS}
  expected.update({("chat", p): generate(model, [encode_chat([{"role": "user", "content": p}], version="v1")],
                                         MAX_TOKENS, tokenizer=tok).texts[0] for p in PROMPTS})
  # A client's abandoned request may still wait (until the server sees the disconnect and the engine's
  # next step drops it) when the client's next one arrives, so the queue holds up to 2 per client.
  engine = Engine(model, tok, max_batch=4, max_context=64, max_queue=2 * CLIENTS, prefill_chunk=16)
  engine.warmup((4, 16))
  engine.start()
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(build_app(engine, tok, "tiny", "v1"), host="127.0.0.1", port=port,
                                         log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{port}"
  while not server.started:
    time.sleep(0.05)
  yield url, engine, expected
  server.should_exit = True
  thread.join(timeout=30)
  engine.stop()


def _client(url: str, expected: dict, index: int, deadline: float) -> dict:
  """One client's requests until ``deadline``: (counts by outcome, the problems seen)."""
  rng = random.Random(index)
  counts, problems = {"answered": 0, "dropped": 0}, []
  with httpx.Client(base_url=url, timeout=60) as http:
    kind = index
    while time.monotonic() < deadline:
      kind, prompt = (kind + 1) % 5, rng.choice(PROMPTS)
      body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
      try:
        if kind == 0:
          r = http.post("/v1/completions", json=body)
          got = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
          ok, want = r.status_code == 200, expected[prompt]
        elif kind == 1:
          with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
          got = "".join(json.loads(ln)["choices"][0]["text"] for ln in lines[:-1])
          ok, want = r.status_code == 200 and lines[-1] == "[DONE]", expected[prompt]
        elif kind == 2:
          chat = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                  "temperature": 0}
          r = http.post("/v1/chat/completions", json=chat)
          got = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
          ok, want = r.status_code == 200, expected[("chat", prompt)]
        elif kind == 3:  # a stream dropped after its first chunk
          with http.stream("POST", "/v1/completions", json={**body, "stream": True, "max_tokens": 40}) as r:
            next(r.iter_lines())
          counts["dropped"] += 1
          continue
        else:  # a completion abandoned before its answer
          try:
            http.post("/v1/completions", json={**body, "max_tokens": 40}, timeout=0.05)
          except httpx.TimeoutException:
            pass
          counts["dropped"] += 1
          continue
      except Exception as e:  # noqa: BLE001 - every unexpected failure is a finding
        problems.append(f"client {index} kind {kind}: {type(e).__name__}: {e}")
        continue
      if not ok or got != want:
        problems.append(f"client {index} kind {kind} {prompt!r}: status {r.status_code}, {got!r} != {want!r}")
      counts["answered"] += 1
  return {"counts": counts, "problems": problems}


def test_32_clients_no_errors_answers_equal_generate_rows_freed(served):
  url, engine, expected = served
  deadline = time.monotonic() + SOAK_S
  with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
    results = list(pool.map(lambda i: _client(url, expected, i, deadline), range(CLIENTS)))
  problems = [p for r in results for p in r["problems"]]
  answered = sum(r["counts"]["answered"] for r in results)
  dropped = sum(r["counts"]["dropped"] for r in results)
  assert not problems, f"{len(problems)} problems in {answered} answers, e.g. {problems[:5]}"
  assert answered >= CLIENTS and dropped >= CLIENTS, (answered, dropped)
  until = time.monotonic() + 20  # dropped requests leave at the engine's next step
  while (engine.busy_rows() or engine.queue_depth()) and time.monotonic() < until:
    time.sleep(0.1)
  assert engine.busy_rows() == 0 and engine.queue_depth() == 0, (engine.busy_rows(), engine.queue_depth())
  metrics = httpx.get(f"{url}/metrics").text
  assert "mixtral_jax_batch_rows_busy 0" in metrics and "mixtral_jax_queue_depth 0" in metrics
  print(f"soak: {answered} answers equal to generate, {dropped} dropped, "
        f"{engine.metrics.requests} requests finished by the engine")
