"""Peak memory of loading with ``quantize="int8"`` (quantized as it is read) against quantizing the
loaded full-precision model, on CPU, where device buffers are host memory.

Generates a random multi-shard Hugging Face checkpoint (fp32, per-expert keys; ``convert_rss.py``'s
writer), then measures in fresh subprocesses the peak RSS (``VmHWM``, see ``convert_rss.py``) of

  baseline    loading a tiny checkpoint with quantize="int8": the interpreter and JAX themselves
  on-load     ``from_pretrained(path, quantize="int8")``
  after-load  the alternative: ``quantize(from_pretrained(path))``

and prints medians over ``--repeats`` runs, their growth over the baseline against the int8 model's
bytes, the float model's bytes and one layer of the largest weight.

  python benchmarks/quantize_load_memory.py              # ~0.9 GB fp32 checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_rss import config, write_checkpoint  # noqa: E402

CHILD = r"""
import json, re, sys, time
import jax
from flax import nnx
import mixtral_jax
from mixtral_jax.inference.quantize import quantize, weight_bytes
mode, src = sys.argv[1:3]
t = time.perf_counter()
if mode == "after-load":
  model = quantize(mixtral_jax.from_pretrained(src))
else:
  model = mixtral_jax.from_pretrained(src, quantize="int8")
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
hwm = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"peak_rss": hwm, "seconds": time.perf_counter() - t, "int8_bytes": weight_bytes(model)}))
"""


def measure(mode, src) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", CHILD, mode, src], capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--ffn", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  mib = 2**20
  with tempfile.TemporaryDirectory(prefix="qload-rss-") as tmp:
    cfg = config(args.layers, args.hidden, args.ffn, 8, args.vocab)
    total, per_layer, _, n_shards = write_checkpoint(os.path.join(tmp, "big"), cfg, 100 * mib)
    write_checkpoint(os.path.join(tmp, "tiny"), config(args.layers, 64, 128, 8, 256), 10 * mib)
    one_weight_layer = 8 * args.hidden * args.ffn * 4  # w1 of one layer, fp32
    print(f"checkpoint: {total / mib:.0f} MiB fp32 in {n_shards} shards; one layer {per_layer / mib:.1f} MiB, "
          f"one layer of w1 {one_weight_layer / mib:.1f} MiB")
    res = {}
    for label, which in (("baseline", "tiny"), ("on-load", "big"), ("after-load", "big")):
      samples = [measure(label if label != "baseline" else "on-load", os.path.join(tmp, which))
                 for _ in range(args.repeats)]
      res[label] = {k: statistics.median(s[k] for s in samples) for k in ("peak_rss", "seconds", "int8_bytes")}
      print(f"{label:>10}: peak RSS {res[label]['peak_rss'] / mib:7.0f} MiB   time {res[label]['seconds']:5.1f}s"
            f"   (median of {args.repeats})")
    base = res["baseline"]["peak_rss"]
    int8 = res["on-load"]["int8_bytes"]
    for label in ("on-load", "after-load"):
      g = res[label]["peak_rss"] - base
      print(f"{label} growth over baseline: {g / mib:.0f} MiB = {g / int8:.2f} x the int8 model "
            f"({int8 / mib:.0f} MiB), {g / total:.2f} x the fp32 model")
    ratio = (res["on-load"]["peak_rss"] - base) / (res["after-load"]["peak_rss"] - base)
    print(f"on-load / after-load growth: {ratio:.2f}")


if __name__ == "__main__":
  main()
