"""Peak host memory of ``mixtral-jax convert`` (streaming) against the checkpoint size.

Generates a random multi-shard Hugging Face checkpoint (fp32, per-expert keys), then measures in fresh
subprocesses (peak RSS: ``VmHWM`` of /proc/self/status, the kernel's high-water mark of the process's
own memory map, file-backed pages included; ``ru_maxrss`` would also count the parent's RSS inherited
through fork):

  baseline   converting a tiny checkpoint: the interpreter, JAX, Orbax and TensorStore themselves
  streaming  ``mixtral_jax.checkpoint.convert`` of the big checkpoint
  in-memory  the alternative: ``from_pretrained`` then Orbax's whole-tree save (``checkpoint.save``)

and prints the medians over ``--repeats`` runs, growth over the baseline, and the ratios.

  python benchmarks/convert_rss.py                      # ~0.8 GB checkpoint
  python benchmarks/convert_rss.py --layers 8 --ffn 4096  # bigger
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, re, sys, time
from mixtral_jax import checkpoint
import mixtral_jax
mode, src, dst = sys.argv[1:4]
t = time.perf_counter()
if mode == "streaming":
  checkpoint.convert(src, dst)
else:
  checkpoint.save(mixtral_jax.from_pretrained(src), dst)
hwm = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"peak_rss": hwm,
                  "seconds": time.perf_counter() - t}))
"""


def config(layers, hidden, ffn, experts, vocab):
  return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
          "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
          "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": experts,
          "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "dtype": "float32"}


def tensors(cfg):
  """(name, shape) of every Hub tensor, in file order."""
  V, D, F, E = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
  H = D // cfg["num_attention_heads"]
  KH = cfg["num_key_value_heads"] * H
  out = [("model.embed_tokens.weight", (V, D))]
  for l in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{l}."
    out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (D, D)), (p + "self_attn.k_proj.weight", (KH, D)),
            (p + "self_attn.v_proj.weight", (KH, D)), (p + "self_attn.o_proj.weight", (D, D)),
            (p + "block_sparse_moe.gate.weight", (E, D))]
    for e in range(E):
      x = f"{p}block_sparse_moe.experts.{e}."
      out += [(x + "w1.weight", (F, D)), (x + "w2.weight", (D, F)), (x + "w3.weight", (F, D))]
  return out + [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def write_checkpoint(directory, cfg, shard_bytes, seed=0):
  """A sharded HF checkpoint written one tensor at a time (this process stays small too)."""
  from mixtral_jax.checkpoint.safetensors_io import Entry, nbytes, write_safetensors

  rng = np.random.default_rng(seed)
  entries = [Entry(n, s, np.dtype(np.float32), lambda s=s: rng.standard_normal(s, np.float32) * 0.02)
             for n, s in tensors(cfg)]
  shards, size = [[]], 0
  for e in entries:
    if shards[-1] and size + nbytes(e) > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes(e)
  os.makedirs(directory)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(directory, name), shard)
    weight_map.update({e.name: name for e in shard})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  total = sum(nbytes(e) for e in entries)
  per_layer = sum(nbytes(e) for e in entries if e.name.startswith("model.layers.0."))
  largest = max(nbytes(e) for e in entries)
  return total, per_layer, largest, len(shards)


def measure(mode, src, dst) -> dict:
  shutil.rmtree(dst, ignore_errors=True)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", CHILD, mode, src, dst], capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
  shutil.rmtree(dst, ignore_errors=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--ffn", type=int, default=2048)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--shard-size-mb", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip-in-memory", action="store_true", help="measure only the streaming path")
  args = p.parse_args()
  mib = 2**20
  with tempfile.TemporaryDirectory(prefix="convert-rss-") as tmp:
    big_cfg = config(args.layers, args.hidden, args.ffn, args.experts, args.vocab)
    t = time.perf_counter()
    total, per_layer, largest, n_shards = write_checkpoint(os.path.join(tmp, "big"), big_cfg,
                                                           args.shard_size_mb * mib)
    print(f"checkpoint: {total / mib:.0f} MiB in {n_shards} shards (fp32), one layer {per_layer / mib:.1f} MiB, "
          f"largest tensor {largest / mib:.1f} MiB; written in {time.perf_counter() - t:.1f}s")
    write_checkpoint(os.path.join(tmp, "tiny"), config(args.layers, 64, 128, args.experts, 256), 10 * mib)
    results = {}
    runs = [("baseline", "streaming", "tiny"), ("streaming", "streaming", "big")]
    if not args.skip_in_memory:
      runs.append(("in-memory", "in-memory", "big"))
    for label, mode, which in runs:
      samples = [measure(mode, os.path.join(tmp, which), os.path.join(tmp, "out")) for _ in range(args.repeats)]
      results[label] = {k: statistics.median(s[k] for s in samples) for k in ("peak_rss", "seconds")}
      print(f"{label:>10}: peak RSS {results[label]['peak_rss'] / mib:7.0f} MiB   "
            f"time {results[label]['seconds']:6.1f}s   (median of {args.repeats})")
    base = results["baseline"]["peak_rss"]
    growth = results["streaming"]["peak_rss"] - base
    print(f"streaming growth over baseline: {growth / mib:.0f} MiB = {growth / total:.3f} x checkpoint, "
          f"{growth / per_layer:.2f} x one layer")
    if "in-memory" in results:
      mem_growth = results["in-memory"]["peak_rss"] - base
      print(f"in-memory growth over baseline: {mem_growth / mib:.0f} MiB = {mem_growth / total:.3f} x checkpoint; "
            f"streaming / in-memory growth = {growth / mem_growth:.3f}")
  return 0 if math.isfinite(growth) else 1


if __name__ == "__main__":
  sys.exit(main())
