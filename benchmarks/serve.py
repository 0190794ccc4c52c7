"""Serving throughput: ``mixtral-jax serve`` (continuous batching) against itself with one row, and
against ``generate`` on a static batch of 16, in one run.

  python benchmarks/serve.py [--preset bench-small] [--clients 1,4,16] [--out-dir /tmp/serve-bench]
                             [--kv-cache-gib N] [--skip-generate]
  python benchmarks/serve.py --servers NAME=MAX_BATCH[:GIB],... [--workload short|mixed] [--context N]
                             [--clients 32] [--rounds 1]

With ``--servers`` the named servers (``:GIB``: paged with that much cache, else fixed rows) all start
first and stay up; each concurrency level then loads them in turn, A B ... then ... B A, ``--rounds``
times, so a drift in the shared machine's load falls on both sides. Each pass prints its figures and
the 1-minute load average at its end; each half (A B .., .. B A) sends new prompts, the same to every
server, so no pass reuses another's cached prefixes. The table gives each server's mean over its passes. ``--workload mixed``:
prompts of 8-300 tokens, one in eight of 1,800-2,000; outputs of 16-128 tokens; one request per client.

A random ``bench-small`` model (V 32000, D 512, L 4, E 8, k 2) is saved once; then, for each server
(``--max-batch 16`` and ``--max-batch 1``, both ``--max-context 256``), for each concurrency c, c
clients send completions requests (streaming, greedy) of mixed prompt lengths (8-128 tokens) and output
lengths (16-64 tokens) until 2c (at least 4) are answered. Reported per point: requests/s, output
tokens/s (from ``usage``), and p50/p99 time to first token (request sent -> first SSE chunk). Each
server first answers one request per prefill shape so compilation is not measured.

Last, in this process, ``generate`` runs the 16 first prompts as one static batch to 64 new tokens
(timed on the second call) with the same cache size; its output tokens/s is the reference for the
target: the server at 16 clients >= 80% of it.

For ``benchmarks/engine_ab.py``: ``same_work_jobs`` (``generate``'s work as 16 requests of 64 tokens, on
prompts the workload does not use) and ``engine_run`` (the engine in this process without HTTP, with its
split of the time into prefill and decode calls).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np

PROMPT_RANGE = (8, 128)
OUTPUT_RANGE = (16, 64)
CONTEXT = 256


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
  rng = np.random.RandomState(seed)
  return [([1] + rng.randint(100, 30000, rng.randint(*PROMPT_RANGE)).tolist(), int(rng.randint(*OUTPUT_RANGE)))
          for _ in range(n)]


def mixed_workload(n: int, seed: int) -> list[tuple[list[int], int]]:
  """Chat-like: most prompts 8-300 tokens, one in eight 1,800-2,000; outputs 16-128 tokens."""
  rng = np.random.RandomState(seed)
  jobs = []
  for i in range(n):
    length = rng.randint(1800, 2000) if i % 8 == 3 else rng.randint(8, 300)
    jobs.append(([1] + rng.randint(100, 30000, length).tolist(), int(rng.randint(16, 128))))
  return jobs


async def one(client, url, name, prompt, max_tokens):
  import httpx  # noqa: PLC0415
  body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
  t0 = time.perf_counter()
  ttft, usage = None, None
  async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
    if r.status_code != 200:
      raise httpx.HTTPStatusError(f"{r.status_code}: {await r.aread()}", request=r.request, response=r)
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      if ttft is None:
        ttft = time.perf_counter() - t0
      chunk = json.loads(line[6:])
      usage = chunk.get("usage") or usage
  return ttft, usage["completion_tokens"]


async def load(url, name, jobs, clients):
  import httpx  # noqa: PLC0415
  queue = list(jobs)
  results = []
  async with httpx.AsyncClient(timeout=600) as client:
    async def worker():
      while queue:
        prompt, k = queue.pop(0)
        results.append(await one(client, url, name, prompt, k))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
  ttfts = np.array([r[0] for r in results])
  tokens = sum(r[1] for r in results)
  return {"requests": len(results), "req_s": len(results) / wall, "tok_s": tokens / wall,
          "ttft_p50": float(np.percentile(ttfts, 50)), "ttft_p99": float(np.percentile(ttfts, 99))}


def start_server(path, name, max_batch, env, extra=(), context=CONTEXT, warm_lengths=(10, 20, 40, 100)):
  """A server process, up and warmed (one request per prefill chunk shape): (process, url). Without
  ``--kv-cache-gib`` in ``extra`` it runs ``--fixed-rows`` (this script's "fixed rows"; serve's default is paged)."""
  from mixtral_jax.inference.launch import launch  # noqa: PLC0415
  if "--kv-cache-gib" not in extra:
    extra = (*extra, "--fixed-rows")
  server = launch(path, "--max-batch", str(max_batch), "--max-context", str(context), "--max-queue", "64",
                  "--served-model-name", name, *extra, env=env, echo=sys.stderr)
  asyncio.run(load(server.url, name, [([1] * n, 2) for n in warm_lengths], 1))
  return server.proc, server.url


SAME_WORK_SEED = 7  # not 16: the 32-request workload's first 16 prompts, which the same server then serves


def same_work_jobs(n=16, new=64) -> list[tuple[list[int], int]]:
  """``generate_static(seed=SAME_WORK_SEED)``'s work as requests: its ``n`` prompts, ``new`` tokens
  each (greedy; the caller checks that no EOS cuts one short: the server has no ``ignore_eos``). Other
  prompts than the workload's, so neither run reuses the other's cached prefixes."""
  return [(p, new) for p, _ in workload(n, seed=SAME_WORK_SEED)]


def engine_run(path, jobs, clients, max_batch=16, gib=None, warm_lengths=(10, 20, 40, 100)) -> dict:
  """The server's engine in this process, without HTTP: ``clients`` requests in flight, each answered
  one followed at once by the next of ``jobs`` (as serve.py's clients do). Output tokens/s, and the
  engine's split of its wall time (``Engine.timing``: prefill and decode calls, tokens, seconds)."""
  import threading  # noqa: PLC0415

  import mixtral_jax  # noqa: PLC0415
  from mixtral_jax.inference.engine import Engine, Request  # noqa: PLC0415
  model = mixtral_jax.from_pretrained(path)
  engine = Engine(model, max_batch=max_batch, max_context=CONTEXT, max_queue=64, kv_cache_gib=gib)
  engine.warmup(warm_lengths)
  queue, lock, done, tokens = list(jobs), threading.Lock(), threading.Event(), []
  left = [len(jobs)]

  def send():
    with lock:
      if not queue:
        return
      prompt, k = queue.pop(0)
    box = []
    req = Request(list(prompt), k, lambda *_: None, lambda *_: finished(box[0]), eos=frozenset([2]))
    box.append(req)
    engine.submit(req)

  def finished(req):
    tokens.append(len(req.row.tokens))
    left[0] -= 1
    if not left[0]:
      done.set()
    send()

  engine.start()
  t0 = time.perf_counter()
  for _ in range(clients):
    send()
  done.wait()
  wall = time.perf_counter() - t0
  engine.stop()
  timing = {k: round(float(v), 3) for k, v in getattr(engine, "timing", {}).items()}
  return {"wall": wall, "tokens": sum(tokens), "tok_s": sum(tokens) / wall, "timing": timing}


def run_server(path, name, max_batch, levels, env, extra=()):
  proc, url = start_server(path, name, max_batch, env, extra)
  try:
    out = {}
    for c in levels:
      out[c] = asyncio.run(load(url, name, workload(max(2 * c, 4), seed=c), c))
      print(f"max-batch {max_batch:2d}, {c:2d} clients: {json.dumps(out[c])}", flush=True)
    return out
  finally:
    proc.terminate()
    proc.wait(timeout=60)


def generate_static(path, n=16, new=64, seed=16):
  """``generate`` on the ``n`` first prompts to ``new`` tokens each (no EOS), timed on the second call;
  ``eos_free``: whether no output holds the EOS id 2 (then a server given these requests, with EOS,
  does exactly this work)."""
  import mixtral_jax  # noqa: PLC0415
  from mixtral_jax.generate import generate  # noqa: PLC0415
  model = mixtral_jax.from_pretrained(path)
  prompts = [p for p, _ in workload(n, seed=seed)]
  generate(model, prompts, new, eos_id=None)  # compile
  t0 = time.perf_counter()
  out = generate(model, prompts, new, eos_id=None)
  wall = time.perf_counter() - t0
  tokens = sum(map(len, out.tokens))
  return {"tokens": tokens, "tok_s": tokens / wall, "eos_free": not any(2 in list(t) for t in out.tokens)}


def alternated(path, preset, specs, levels, rounds, mixed, context, env):
  """Every server of ``specs`` [(name, max_batch, gib or None)] up at once; each level loads them in the
  order A B .. then .. B A, ``rounds`` times. Prints each pass and the table of means."""
  warm = (10, 20, 40, 100, 200, 2000) if mixed else (10, 20, 40, 100)
  servers = {}
  try:
    for name, max_batch, gib in specs:
      extra = () if gib is None else ("--kv-cache-gib", str(gib))
      servers[name] = start_server(path, preset, max_batch, env, extra, context, warm)
    passes = {(name, c): [] for name, _, _ in specs for c in levels}
    for c in levels:
      order = [n for n, _, _ in specs]
      for half, names in enumerate([order, order[::-1]] * rounds):
        # New prompts for each half (each server sees them once: no prefix-cache hits across passes).
        jobs = (mixed_workload if mixed else workload)(c if mixed else max(2 * c, 4), seed=100 * c + half)
        for name in names:
          r = asyncio.run(load(servers[name][1], preset, jobs, c))
          r["load1"] = os.getloadavg()[0]
          passes[(name, c)].append(r)
          print(f"{name}, {c} clients: {json.dumps(r)}", flush=True)
  finally:
    for proc, _ in servers.values():
      proc.terminate()
      proc.wait(timeout=60)
  print("\n| clients | server | passes: output tok/s (load avg) | mean tok/s | mean TTFT p50 |")
  print("|---|---|---|---|---|")
  for c in levels:
    for name, max_batch, gib in specs:
      rs = passes[(name, c)]
      mode = "fixed rows" if gib is None else f"paged {gib:g} GiB"
      runs = ", ".join(f"{r['tok_s']:.1f} ({r['load1']:.1f})" for r in rs)
      print(f"| {c} | {name} (max-batch {max_batch}, {mode}) | {runs} | {np.mean([r['tok_s'] for r in rs]):.1f} | "
            f"{np.mean([r['ttft_p50'] for r in rs]):.2f} s |")


def parse_servers(text: str):
  """``NAME=MAX_BATCH[:GIB],...`` -> [(name, max_batch, gib or None)]."""
  specs = []
  for item in text.split(","):
    name, _, rest = item.partition("=")
    batch, _, gib = rest.partition(":")
    specs.append((name, int(batch), float(gib) if gib else None))
  return specs


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--servers", help="NAME=MAX_BATCH[:GIB],...: compare these servers, alternated (see above)")
  p.add_argument("--workload", choices=("short", "mixed"), default="short")
  p.add_argument("--context", type=int, default=CONTEXT, help="--max-context of the servers (with --servers)")
  p.add_argument("--rounds", type=int, default=1, help="A B .. B A passes per level (with --servers)")
  p.add_argument("--preset", default="bench-small")
  p.add_argument("--clients", default="1,4,16")
  p.add_argument("--out-dir", default="/tmp/serve-bench")
  p.add_argument("--kv-cache-gib", type=float, help="serve both servers with the paged KV cache of this size")
  p.add_argument("--skip-generate", action="store_true", help="leave out the static generate reference")
  args = p.parse_args()
  levels = [int(c) for c in args.clients.split(",")]
  import mixtral_jax  # noqa: PLC0415
  from mixtral_jax.checkpoint import save  # noqa: PLC0415
  path = os.path.join(args.out_dir, args.preset)
  if not os.path.exists(path):
    save(mixtral_jax.create_model(mixtral_jax.get_config(args.preset), seed=0), path)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if args.servers:
    alternated(path, args.preset, parse_servers(args.servers), levels, args.rounds, args.workload == "mixed",
               args.context, env)
    return
  extra = () if args.kv_cache_gib is None else ("--kv-cache-gib", str(args.kv_cache_gib))
  batched = run_server(path, args.preset, 16, levels, env, extra)
  single = run_server(path, args.preset, 1, levels, env, extra)
  static = {"tok_s": float("nan")} if args.skip_generate else generate_static(path)
  print(f"generate, static batch of 16 x 64 new tokens: {static['tok_s']:.1f} output tokens/s")
  print("\n| clients | max-batch 16: req/s | tok/s | TTFT p50 | p99 | max-batch 1: req/s | tok/s | TTFT p50 | p99 |")
  print("|---|---|---|---|---|---|---|---|---|")
  for c in levels:
    b, s = batched[c], single[c]
    print(f"| {c} | {b['req_s']:.2f} | {b['tok_s']:.1f} | {b['ttft_p50']:.2f} s | {b['ttft_p99']:.2f} s | "
          f"{s['req_s']:.2f} | {s['tok_s']:.1f} | {s['ttft_p50']:.2f} s | {s['ttft_p99']:.2f} s |")
  top = max(levels)
  print(f"\nserver at {top} clients / generate batch 16: {batched[top]['tok_s'] / static['tok_s']:.2f} "
        f"(target >= 0.80); max-batch 16 / max-batch 1 at {top} clients: "
        f"{batched[top]['tok_s'] / single[top]['tok_s']:.2f}")


if __name__ == "__main__":
  main()
