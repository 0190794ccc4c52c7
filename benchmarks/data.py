"""The data pipeline alone: peak RSS and tokens/s delivered over token shards, and tokenize throughput.

  PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/data.py [--gb 2] [--batches 200]

1. Writes synthetic token shards (uint16, documents of random length opened by BOS) of --gb GB of tokens
   and of 1/8 of that in /tmp (free disk is checked first; both are deleted afterwards).
2. For each corpus, in a fresh interpreter: RSS after the imports (the baseline), then the training
   pipeline (manifest, checksum verification of every shard, rows, Grain iterator with 2 reader threads)
   for --batches global batches of 8 x 4096; reports peak RSS over the baseline and tokens/s delivered.
   Beside it, the pipeline before issue 10 (the whole corpus in memory as int32 tokens plus a bool
   document-start array) on the small corpus: its RSS over the same baseline.
3. ``tokenize`` throughput on Python standard-library source: 1 worker, then 2 (tokens/s per worker,
   and the scaling 1 -> 2), spawn start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SHARD_TOKENS = 64 << 20
B, T = 8, 4096

CHILD = r"""
import json, os, sys, time
import numpy as np
import grain  # noqa: F401 - imported for the baseline, as a training process has it
from mixtral_jax.train.data import BatchIterator, ShardSet, TextRows, load_manifest
def rss_mb():
  return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
directory, batches, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
base = rss_mb()
m = load_manifest(directory)
t0 = time.perf_counter()
if mode == "in_memory":  # the pipeline before issue 10: every token in memory
  s = ShardSet(directory, m, "train")
  tokens = np.concatenate([f.read_all().astype(np.int32) for f in s.tokens])
  is_start = tokens == 1
  out = {"tokens": len(tokens)}
else:
  s = ShardSet(directory, m, "train")
  s.verify()
  t_verify = time.perf_counter() - t0
  it = BatchIterator(TextRows(s, %d), %d, 1, seed=0, threads=2, prefetch=4)
  next(it)
  t1 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t1
  it.close()
  out = {"tokens_per_s": batches * b["inputs"].size / dt, "verify_s": t_verify, "corpus_tokens": s.num_tokens}
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so it would show the parent's peak
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
out.update(baseline_mb=base, peak_over_baseline_mb=peak - base)
print(json.dumps(out))
""" % (T, B)


def write_corpus(directory: str, tokens: int) -> None:
  from mixtral_jax.train.data import shards
  from mixtral_jax.tokenizer import Tokenizer

  os.makedirs(directory)
  rng = np.random.default_rng(0)
  records = []
  for k in range(-(-tokens // SHARD_TOKENS)):
    n = min(SHARD_TOKENS, tokens - k * SHARD_TOKENS)
    toks = rng.integers(3, 32000, n, dtype=np.uint16)
    starts = np.sort(rng.choice(n, max(n // 2000, 1), replace=False))
    starts[0] = 0
    toks[starts] = 1  # BOS opens each document
    rec = shards.write_shard(directory, f"train-{k:05d}", {"tokens": toks, "docs": starts.astype(np.int64)},
                             {"key": "synthetic", "split": "train", "tokens": n, "documents": len(starts),
                              "sources": [["synthetic", len(starts)]], "input_bytes": 0})
    records.append({x: rec[x] for x in ("name", "tokens", "documents", "files")})
  tok = Tokenizer.load("v1")
  manifest = {"format_version": shards.FORMAT_VERSION, "kind": "text", "plan_key": "synthetic",
              "tokenizer": {"fingerprint": shards.tokenizer_fingerprint(tok.path), "path": tok.path,
                            "vocab_size": tok.vocab_size, "bos_id": 1, "eos_id": 2, "pad_id": 0},
              "dtype": "uint16", "splits": {"train": {"tokens": tokens, "documents": 0, "shards": records},
                                            "heldout": {"tokens": 0, "documents": 0, "shards": []}}}
  shards.write_json_atomic(os.path.join(directory, shards.MANIFEST), manifest)


def child(directory: str, batches: int, mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD, directory, str(batches), mode], capture_output=True,
                       text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return json.loads(out.stdout.strip().splitlines()[-1])


def tokenize_throughput(workdir: str, mb: float) -> dict:
  from mixtral_jax.tokenizer import Tokenizer
  from mixtral_jax.train.data import TokenizeSpec, find_files, tokenize

  pairs, size = [], 0
  for pair in find_files(["stdlib"], (".py",)):
    pairs.append(pair)
    size += os.path.getsize(pair[1])
    if size > mb * 2**20:
      break
  spec = TokenizeSpec(tokenizer=Tokenizer.load("v1").path, heldout_fraction=0.0, shard_mb=mb / 8)
  out = {}
  for workers in (1, 2):
    t0, cpu0 = time.perf_counter(), _cpu_s()
    m = tokenize([], os.path.join(workdir, f"w{workers}"), spec, workers=workers, progress=False, pairs=pairs)
    dt, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    n = m["splits"]["train"]["tokens"]
    # per CPU-second too: on a shared machine the wall clock also measures the other tenants
    out[workers] = {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "tokens_per_s_per_worker": n / dt / workers,
                    "tokens_per_cpu_s": n / cpu, "load_avg_1min": os.getloadavg()[0]}
  out["scaling_1_to_2"] = out[2]["tokens_per_s"] / out[1]["tokens_per_s"]
  out["input_mb"] = size / 2**20
  return out


def _cpu_s() -> float:
  """User + system CPU seconds of this process and of its finished children (the tokenize workers)."""
  import resource  # noqa: PLC0415
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gb", type=float, default=2.0, help="GB of tokens in the big corpus (uint16: 2 bytes each)")
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--tokenize-mb", type=float, default=16.0, help="MB of stdlib source for the tokenize figures")
  p.add_argument("--only-tokenize", action="store_true", help="just the tokenize figures")
  args = p.parse_args()
  if args.only_tokenize:
    with tempfile.TemporaryDirectory() as d:
      print(json.dumps(tokenize_throughput(d, args.tokenize_mb)))
    return
  big = int(args.gb * 2**30) // 2
  need = (big + big // 8) * 2 * 1.1 + 2**30
  free = shutil.disk_usage(tempfile.gettempdir()).free
  if free < need:
    sys.exit(f"needs {need / 2**30:.1f} GB free in {tempfile.gettempdir()}, has {free / 2**30:.1f}")
  root = tempfile.mkdtemp(prefix="mixtral-data-bench-")
  try:
    results = {}
    for name, tokens in (("small", big // 8), ("big", big)):
      d = os.path.join(root, name)
      t0 = time.perf_counter()
      write_corpus(d, tokens)
      print(f"{name}: wrote {tokens * 2 / 2**30:.2f} GB of tokens in {time.perf_counter() - t0:.0f}s", flush=True)
      results[name] = child(d, args.batches, "grain")
      print(name, results[name], flush=True)
    results["in_memory_small"] = child(os.path.join(root, "small"), 0, "in_memory")
    print("in-memory (before issue 10), small corpus:", results["in_memory_small"], flush=True)
    shutil.rmtree(os.path.join(root, "big"))
    results["tokenize"] = tokenize_throughput(root, args.tokenize_mb)
    print("tokenize:", json.dumps(results["tokenize"]), flush=True)
    print(json.dumps(results))
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
