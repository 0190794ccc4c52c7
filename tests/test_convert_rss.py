"""Conversion streams: converting a ~320 MB multi-shard checkpoint raises the converter's peak RSS (the
kernel's high-water mark, measured in a fresh subprocess) by about one layer, far below the model.

Baseline: the same conversion of a tiny checkpoint, so the interpreter, JAX, Orbax and TensorStore
themselves are not counted. ``benchmarks/convert_rss.py`` measures larger checkpoints and the
non-streaming alternative.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

pytestmark = pytest.mark.subprocess_cli

# VmHWM: the high-water mark of this process's own memory map. (ru_maxrss would also count the
# parent's RSS, inherited through fork before exec.)
CHILD = """
import re, sys
from mixtral_jax import checkpoint
checkpoint.convert(sys.argv[1], sys.argv[2])
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""


def write_hf(directory, *, layers, hidden, ffn, vocab, experts=8, shard_layers=1):
  """A random fp32 HF checkpoint with per-expert keys, one shard per ``shard_layers`` layers.
  Returns (total bytes, bytes of one layer)."""
  rng = np.random.default_rng(0)
  rand = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
  H = hidden // 8
  os.makedirs(directory)
  cfg = {"model_type": "mixtral", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
         "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
         "num_local_experts": experts, "num_experts_per_tok": 2, "rope_theta": 1e6}
  (directory / "config.json").write_text(json.dumps(cfg))
  shards = [{"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
             "model.norm.weight": rand(hidden)}]
  for l in range(layers):
    p = f"model.layers.{l}."
    t = {p + "input_layernorm.weight": rand(hidden), p + "post_attention_layernorm.weight": rand(hidden),
         p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(2 * H, hidden),
         p + "self_attn.v_proj.weight": rand(2 * H, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
         p + "block_sparse_moe.gate.weight": rand(experts, hidden)}
    for e in range(experts):
      x = f"{p}block_sparse_moe.experts.{e}."
      t.update({x + "w1.weight": rand(ffn, hidden), x + "w2.weight": rand(hidden, ffn),
                x + "w3.weight": rand(ffn, hidden)})
    shards.append(t)
  weight_map, total = {}, 0
  for i, tensors in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(tensors, str(directory / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    total += sum(v.nbytes for v in tensors.values())
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return total, sum(v.nbytes for v in shards[1].values())


def peak_rss(src, dst):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (dst / "params" / "_METADATA").exists()
  return int(out.stdout.strip().splitlines()[-1])


def test_convert_peak_rss_stays_near_one_layer(tmp_path):
  size, layer = write_hf(tmp_path / "big", layers=6, hidden=512, ffn=1024, vocab=4096)
  write_hf(tmp_path / "tiny", layers=2, hidden=64, ffn=128, vocab=256)
  assert size > 300 * 2**20 and layer > 50 * 2**20
  growth = peak_rss(tmp_path / "big", tmp_path / "big_out") - peak_rss(tmp_path / "tiny", tmp_path / "tiny_out")
  print(f"checkpoint {size / 2**20:.0f} MiB, one layer {layer / 2**20:.1f} MiB, "
        f"peak RSS growth {growth / 2**20:.0f} MiB")
  assert growth < 2 * layer, (growth, layer)
  assert growth < 0.3 * size, (growth, size)
