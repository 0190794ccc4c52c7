"""A/B of generation between two source trees in one run: decode at batch 1 and 16, the server at 16
clients, and ``generate`` on serve.py's static batch of 16, alternating the trees round by round.

  python benchmarks/engine_ab.py --base /tmp/base [--rounds 2] [--figures all|serve] [--out-dir /tmp/engine-ab]
                                 [--kv-cache-gib G]

Each tree runs in its own child process with its own virtual environment's Python (``TREE/.venv``,
which imports ``mixtral_jax`` from TREE), in the order base, new, new, base, ... so that load changes
hit both alike. The child loads one random ``bench-small`` checkpoint (saved once by the base tree, so
both read the same weights) and measures:

  - decode tokens/s at batch 1 and 16 (128-token prompts, greedy, no EOS): batch * (NEW - 1) /
    (time(generate NEW tokens) - time(generate 1 token)), as ``benchmarks/decode.py`` does;
  - ``generate`` on the 16 first prompts of serve.py's workload, 64 new tokens, output tokens/s;
  - ``mixtral-jax serve --max-batch 16`` at 16 clients (serve.py's client and workload, 32 requests),
    output tokens/s (``serve16``); with ``--kv-cache-gib G`` the server is paged (else the CLI's default);
  - the same server given ``generate``'s work (``serve16_same``): 16 other prompts (serve.py's
    ``same_work_jobs``, so no cached prefix of the first pass is reused), 64 tokens each, all 16 clients
    at once, against ``generate`` on those 16 prompts (``generate16_same``); ``eos_free`` says whether no
    greedy output holds EOS, i.e. whether the server did exactly ``generate``'s work;
  - with ``--kv-cache-gib``, the server's engine in the child's process without HTTP on the 32-request
    workload (``engine16``), and its split of the time into prefill and decode calls (``timing``).

Reported: per tree the median over rounds of each figure, new / base, and server / generate per tree.
The load average is printed at the start of each child.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = 65  # tokens per decode measurement (64 decode steps after the first token)


def child(path: str, figures: str, gib: float | None = None) -> dict:
  """The measurements of the tree this Python imports (see the module docstring); ``figures``: "all",
  or "serve" for the server and static ``generate`` only."""
  import numpy as np  # noqa: PLC0415

  import mixtral_jax  # noqa: PLC0415
  from mixtral_jax.generate import generate  # noqa: PLC0415
  sys.path.insert(0, HERE)
  import serve  # noqa: PLC0415 - serve.py's client, workload and static generate

  out = {"load": os.getloadavg()[0], "tree": os.path.dirname(os.path.dirname(mixtral_jax.__file__))}
  model = mixtral_jax.from_pretrained(path)
  rng = np.random.RandomState(0)
  for B in (1, 16) if figures == "all" else ():
    prompts = [rng.randint(100, 30000, 128).tolist() for _ in range(B)]
    times = {}
    for n in (1, NEW):
      generate(model, prompts, n, eos_id=None)  # compile
      t0 = time.perf_counter()
      generate(model, prompts, n, eos_id=None)
      times[n] = time.perf_counter() - t0
    out[f"decode_b{B}"] = B * (NEW - 1) / (times[NEW] - times[1])
  out["generate16"] = serve.generate_static(path)["tok_s"]
  same = serve.generate_static(path, seed=serve.SAME_WORK_SEED)
  out["generate16_same"], out["eos_free"] = same["tok_s"], same["eos_free"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  extra = () if gib is None else ("--kv-cache-gib", str(gib))
  proc, url = serve.start_server(path, "bench-small", 16, env, extra)
  try:
    out["serve16"] = asyncio.run(serve.load(url, "bench-small", serve.workload(32, seed=16), 16))["tok_s"]
    out["serve16_same"] = asyncio.run(serve.load(url, "bench-small", serve.same_work_jobs(), 16))["tok_s"]
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  if gib is not None:
    try:
      out["engine16"] = serve.engine_run(path, serve.workload(32, seed=16), 16, 16, gib)
    except Exception as e:  # noqa: BLE001 - the figures above stand without this one
      out["engine16"] = f"{type(e).__name__}: {e}"
  out["load_end"] = os.getloadavg()[0]
  return out


def run_tree(tree: str, path: str, figures: str, gib: float | None = None) -> dict:
  python = os.path.join(tree, ".venv", "bin", "python")
  more = [] if gib is None else ["--kv-cache-gib", str(gib)]
  proc = subprocess.run([python, os.path.abspath(__file__), "--child", path, "--figures", figures, *more],
                        capture_output=True, text=True,
                        cwd=tree, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{tree} failed:\n{proc.stderr[-3000:]}")
  result = json.loads(lines[-1][len("RESULT "):])
  print(json.dumps(result), flush=True)
  return result


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", help="the other tree (with its own .venv); required")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--out-dir", default="/tmp/engine-ab")
  p.add_argument("--figures", choices=("all", "serve"), default="all",
                 help="serve: only the server at 16 clients and static generate (not decode)")
  p.add_argument("--kv-cache-gib", type=float, help="serve with the paged KV cache of this size (both trees)")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(args.child, args.figures, args.kv_cache_gib)), flush=True)
    return
  if not args.base:
    p.error("--base TREE is required")
  new = os.path.dirname(HERE)
  path = os.path.join(args.out_dir, "bench-small")
  if not os.path.exists(path):
    code = ("import mixtral_jax, sys; from mixtral_jax.checkpoint import save; "
            "save(mixtral_jax.create_model(mixtral_jax.get_config('bench-small'), seed=0), sys.argv[1])")
    subprocess.run([os.path.join(args.base, ".venv", "bin", "python"), "-c", code, path], check=True, cwd=args.base)
  runs = {"base": [], "new": []}
  for r in range(args.rounds):
    for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
      runs[name].append(run_tree(args.base if name == "base" else new, path, args.figures, args.kv_cache_gib))
  keys = ("decode_b1", "decode_b16", "generate16", "serve16", "generate16_same", "serve16_same")
  keys = keys[0 if args.figures == "all" else 2:]
  med = {name: {k: statistics.median(x[k] for x in rs) for k in keys} for name, rs in runs.items()}
  print("\n| figure (tokens/s) | base | new | new / base |\n|---|---|---|---|")
  for k in keys:
    print(f"| {k} | {med['base'][k]:.1f} | {med['new'][k]:.1f} | {med['new'][k] / med['base'][k]:.2f} |")
  for name in ("base", "new"):
    print(f"{name}: server at 16 clients / generate batch 16 = {med[name]['serve16'] / med[name]['generate16']:.2f}; "
          f"same work: {med[name]['serve16_same'] / med[name]['generate16_same']:.2f} "
          f"(EOS-free: {[x['eos_free'] for x in runs[name]]})")
  print("load averages at each child's start:", {n: [round(x["load"], 1) for x in rs] for n, rs in runs.items()})


if __name__ == "__main__":
  main()
