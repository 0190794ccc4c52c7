"""Everything one lent GPU (H100 / H200) can tell us, in one command of at most about 8 minutes.

  python benchmarks/accelerator.py --out results/h100          # on the GPU: JSON + markdown table
  python benchmarks/accelerator.py --smoke --out /tmp/smoke     # the same code on CPU, tiny shapes (CI)

Sections, every figure also as a fraction of the card's peak:

1. train-step MFU at 8x7B widths with 2 layers (bf16 compute, fp32 master weights, remat full), dropless
   and capacity factor 1.25: model FLOPs (``train.metrics.train_flops_per_token``) per second / peak bf16.
2. MoE layer (the model's ``MoE`` block, ``value_and_grad``) at 8x7B widths, per expert kernel: useful
   TFLOP/s = 3 x 2 x tokens x k x 3 x D x F per step / time (top-k expert matmuls, forward + backward).
3. Attention, ``value_and_grad`` of causal self-attention at 4k and 16k (8x7B heads: 32 / 8 x 128),
   cuDNN and the flash kernel against blockwise: useful TFLOP/s = 12 x N x H x visible pairs / time, and
   each kernel's largest output difference from blockwise on the same inputs.
4. Decode tokens/s at batch 1 and 8, bf16 and int8 weights (the 2-layer 8x7B-width model), against the
   HBM-bandwidth bound: bandwidth / bytes a step must read (the weights it touches: attention, router,
   LM head, the experts the batch can reach, and the KV cache).

Peaks (``CARDS``) are NVIDIA's spec-sheet numbers, dense (no sparsity), for the SXM cards. Under
``--smoke`` (CPU) the "peak" is this machine's measured float32 matmul rate and copy bandwidth, labelled
as measured. Times are medians of ``--repeats`` runs after a warm-up (compile) run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--smoke" in sys.argv:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mixtral_jax.attn import attend  # noqa: E402
from mixtral_jax.config import get_config  # noqa: E402
from mixtral_jax.generate import generate  # noqa: E402
from mixtral_jax.inference.quantize import quantize, weight_bytes  # noqa: E402
from mixtral_jax.moe import MoE  # noqa: E402
from mixtral_jax.params import create_model  # noqa: E402
from mixtral_jax.sharding.mesh import make_mesh  # noqa: E402
from mixtral_jax.train import step as step_lib  # noqa: E402
from mixtral_jax.train.config import TrainConfig  # noqa: E402
from mixtral_jax.train.metrics import measure_peak_flops, train_flops_per_token  # noqa: E402

SHEET_H100 = "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 989 TFLOPS dense, INT8 1,979 TOPS dense, 3.35 TB/s"
SHEET_H200 = "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 989 TFLOPS dense, INT8 1,979 TOPS dense, 4.8 TB/s"
CARDS = {"H100": dict(bf16=989e12, int8=1979e12, hbm=3.35e12, source=SHEET_H100),
         "H200": dict(bf16=989e12, int8=1979e12, hbm=4.8e12, source=SHEET_H200)}

# (full size, --smoke size) of every shape the sections use.
SIZES = {
    "model": ("mixtral-8x7b", "tiny"),
    "train_batch": ((2, 4096), (2, 32)),
    "moe_tokens": (8192, 128),
    "attn_T": ((4096, 16384), (128,)),
    "attn_heads": ((32, 8, 128), (4, 2, 16)),
    "decode": ((128, 64), (8, 4)),  # prompt, new tokens
}


def median_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up: compiles
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def copy_bandwidth(nbytes=1 << 28, repeats=5) -> float:
  """(read + write bytes) / time of copying a large array into a donated buffer (STREAM copy)."""
  src = jnp.arange(nbytes // 4, dtype=jnp.float32)
  copy = jax.jit(lambda s, d: jax.lax.dynamic_update_slice(d, s, (0,)), donate_argnums=1)
  box = {"dst": copy(src, jnp.zeros_like(src))}

  def run():
    box["dst"] = copy(src, box["dst"])
    return box["dst"]
  return 2 * nbytes / median_time(run, repeats)


def card_peaks(smoke: bool) -> dict:
  kind = jax.devices()[0].device_kind
  for name, peaks in CARDS.items():
    if name in kind and not smoke:
      return {"card": kind, **peaks}
  if not smoke:
    raise SystemExit(f"unknown card {kind!r}: known {', '.join(CARDS)}; run with --smoke on other devices")
  flops = measure_peak_flops(512, 3)
  return {"card": kind, "bf16": flops, "int8": flops, "hbm": copy_bandwidth(),
          "source": "measured on this machine (float32 matmul, array copy): --smoke"}


def model_cfg(smoke: bool, **overrides):
  """8x7B widths with 2 layers; under --smoke the tiny preset with 1 layer and a 512-token vocabulary
  (CI time is mostly compiling)."""
  name = SIZES["model"][smoke]
  shrink = {"num_hidden_layers": 1, "vocab_size": 512} if smoke else {"num_hidden_layers": 2}
  return get_config(name, dtype="bfloat16", **{**shrink, **overrides})


def row(section, name, value, unit, fraction, of, **extra) -> dict:
  return {"section": section, "name": name, "value": value, "unit": unit, "fraction_of_peak": fraction,
          "peak": of, **extra}


# ------------------------------------------------------------------------------------ 1. train step


def train_rows(smoke: bool, peaks: dict, repeats: int) -> list[dict]:
  B, T = SIZES["train_batch"][smoke]
  rows = []
  for label, cf in (("dropless", None), ("capacity 1.25", 1.25)):
    cfg = model_cfg(smoke, capacity_factor=cf, remat="none" if smoke else "full")
    train = TrainConfig().override({"data.batch_size": B, "data.seq_len": T, "train.steps": 1000})
    mesh = make_mesh(None, devices=jax.devices()[:1])
    step_fn, _, _ = step_lib.build_train_step(cfg, train, mesh)
    box = {"state": step_lib.init_state(cfg, train, mesh)}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, B, T + 1)).astype(np.int32)
    batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": np.ones((1, B, T), np.float32),
             "segment_ids": np.ones((1, B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy()}
    batch = jax.device_put(batch, step_lib.batch_sharding(mesh))

    def run():
      box["state"], metrics = step_fn(box["state"], batch)
      return metrics["loss"]
    t = median_time(run, repeats)
    flops = train_flops_per_token(cfg, T) * B * T / t
    rows.append(row("train", f"train step {label} ({B} x {T}, {cfg.num_hidden_layers} layers)", flops / 1e12,
                    "TFLOP/s (model)", flops / peaks["bf16"], "bf16", seconds=t))
    del box, step_fn
  return rows


# ------------------------------------------------------------------------------------ 2. MoE layer


def moe_kernels(smoke: bool) -> list[tuple[str, dict]]:
  """(label, config overrides) per expert kernel this platform can run."""
  if smoke:
    grouped = [("blocked", {"moe_impl": "blocked"}), ("ragged (lax.ragged_dot)", {"moe_impl": "ragged"})]
  else:
    grouped = [("triton (tokamax)", {"moe_impl": "triton"}), ("mosaic_gpu (tokamax)", {"moe_impl": "mosaic_gpu"})]
  return grouped + [("capacity 1.25, dense buckets", {"capacity_factor": 1.25})]


def moe_rows(smoke: bool, peaks: dict, repeats: int) -> list[dict]:
  N = SIZES["moe_tokens"][smoke]
  rows = []
  for label, overrides in moe_kernels(smoke):
    cfg = model_cfg(smoke, **overrides)
    D, F, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (1, N, D), jnp.float32).astype(jnp.bfloat16)

    def loss(state, x):
      y, _, _ = nnx.merge(graphdef, state)(x)
      return jnp.sum(y.astype(jnp.float32))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    try:
      t = median_time(lambda: step(state, x), repeats)
    except Exception as e:  # noqa: BLE001  a kernel this card or library version cannot run: say which
      rows.append(row("moe", f"MoE layer {label}", None, "TFLOP/s", None, "bf16", error=str(e).splitlines()[0]))
      continue
    flops = 3 * 2 * N * k * 3 * D * F / t
    rows.append(row("moe", f"MoE layer {label} ({N} tokens, D {D}, F {F})", flops / 1e12, "TFLOP/s (top-k)",
                    flops / peaks["bf16"], "bf16", seconds=t))
  return rows


# ------------------------------------------------------------------------------------ 3. attention


def attention_impls(smoke: bool) -> dict:
  """name -> attention(q, k, v, pos): the kernels against blockwise (on CPU: dense, and the flash
  kernel's mask through tokamax's reference kernel)."""
  from mixtral_jax.attn.flash import flash_attention  # noqa: PLC0415

  def by(impl):
    return lambda q, k, v, pos: attend(q, k, v, pos, pos, impl=impl, index_aligned=True, padded=False)
  if smoke:
    return {"blockwise": by("blockwise"), "dense": by("dense"),
            "flash (tokamax xla reference)": lambda q, k, v, pos: flash_attention(q, k, v, pos, kernel="xla")}
  return {"blockwise": by("blockwise"), "cudnn": by("cudnn"), "flash (tokamax triton)": by("flash")}


def attention_rows(smoke: bool, peaks: dict, repeats: int) -> list[dict]:
  N, K, H = SIZES["attn_heads"][smoke]
  rows = []
  for T in SIZES["attn_T"][smoke]:
    keys = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(keys[0], (1, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, T, K, H), jnp.bfloat16) for kk in keys[1:3])
    ct = jax.random.normal(keys[3], (1, T, N, H), jnp.float32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    outs = {}
    for name, fn in attention_impls(smoke).items():
      loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, pos).astype(jnp.float32) * ct)  # noqa: E731
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      try:
        t = median_time(lambda: step(q, k, v), repeats)
        outs[name] = np.asarray(jax.jit(fn)(q, k, v, pos), np.float32)
      except Exception as e:  # noqa: BLE001
        rows.append(row("attention", f"{name} T={T}", None, "TFLOP/s", None, "bf16", error=str(e).splitlines()[0]))
        continue
      flops = 12 * N * H * (T * (T + 1) // 2) / t
      diff = float(np.abs(outs[name] - outs["blockwise"]).max()) if "blockwise" in outs else None
      rows.append(row("attention", f"{name} T={T} (causal, {N}/{K} heads x {H})", flops / 1e12, "TFLOP/s (useful)",
                      flops / peaks["bf16"], "bf16", seconds=t, max_abs_diff_vs_blockwise=diff))
  return rows


# ------------------------------------------------------------------------------------ 4. decode


def step_read_bytes(model, B: int, context: int, quantized: bool) -> float:
  """Bytes one decode step must read: every weight but the embedding table and the experts, the
  experts that B tokens can reach (expected distinct of E when each picks k at random), B embedding
  rows, and the KV cache (bf16) up to ``context``."""
  cfg = model.cfg
  L, D, F, E, k, V = (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts,
                      cfg.num_experts_per_tok, cfg.vocab_size)
  per_param = 1 if quantized else 2  # int8 or bf16 (scales are a small remainder, counted in "other")
  total = weight_bytes(model)
  experts = L * E * 3 * D * F * per_param
  embed = V * D * 2
  reached = E * (1 - (1 - k / E) ** B)
  kv = L * B * context * 2 * cfg.num_key_value_heads * cfg.head_size * 2
  return (total - experts - embed) + experts * reached / E + B * D * 2 + kv


def decode_rows(smoke: bool, peaks: dict, repeats: int) -> list[dict]:
  prompt, new = SIZES["decode"][smoke]
  rows = []
  for mode in ("bf16", "int8"):
    cfg = model_cfg(smoke, param_dtype="bfloat16")
    model = create_model(cfg, seed=0)
    if mode == "int8":
      quantize(model, "int8")
    for B in (1, 8):
      prompts = np.random.default_rng(B).integers(3, cfg.vocab_size, (B, prompt)).tolist()
      full = median_time(lambda: generate(model, prompts, new, eos_id=None).tokens, repeats)  # noqa: B023
      first = median_time(lambda: generate(model, prompts, 1, eos_id=None).tokens, repeats)  # noqa: B023
      rate = B * (new - 1) / max(full - first, 1e-9)
      bound = B * peaks["hbm"] / step_read_bytes(model, B, prompt + new, mode == "int8")
      rows.append(row("decode", f"decode {mode} batch {B} ({cfg.num_hidden_layers} layers)", rate, "tokens/s",
                      rate / bound, "HBM bandwidth bound", bound_tokens_per_s=bound))
    del model
  return rows


# ------------------------------------------------------------------------------------ report

SECTIONS = {"train": train_rows, "moe": moe_rows, "attention": attention_rows, "decode": decode_rows}


def markdown(report: dict) -> str:
  peaks = report["peaks"]
  lines = [f"# accelerator benchmark: {peaks['card']}", "",
           f"jax {report['jax']}, {report['platform']}{' (--smoke: tiny shapes)' if report['smoke'] else ''}; "
           f"peaks: {peaks['source']} (bf16 {peaks['bf16'] / 1e12:.3g} TFLOP/s, HBM {peaks['hbm'] / 1e12:.3g} TB/s)",
           "", "| section | measurement | value | unit | fraction of peak | note |", "|---|---|---|---|---|---|"]
  for r in report["rows"]:
    value = "failed" if r["value"] is None else f"{r['value']:.4g}"
    frac = "" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.3f} of {r['peak']}"
    note = r.get("error") or ""
    if r.get("max_abs_diff_vs_blockwise") is not None:
      note = f"max abs diff vs blockwise {r['max_abs_diff_vs_blockwise']:.3g}"
    if "bound_tokens_per_s" in r:
      note = f"bound {r['bound_tokens_per_s']:.4g} tokens/s"
    lines.append(f"| {r['section']} | {r['name']} | {value} | {r['unit']} | {frac} | {note} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="directory for accelerator.json and accelerator.md")
  p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same code path, for CI")
  p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
  p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; 1 with --smoke)")
  args = p.parse_args(argv)
  repeats = args.repeats or (1 if args.smoke else 5)
  started = time.perf_counter()
  peaks = card_peaks(args.smoke)
  report = {"jax": jax.__version__, "platform": jax.devices()[0].platform, "smoke": args.smoke, "peaks": peaks,
            "rows": []}
  os.makedirs(args.out, exist_ok=True)
  for name in args.sections:
    t = time.perf_counter()
    report["rows"] += SECTIONS[name](args.smoke, peaks, repeats)
    print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    with open(os.path.join(args.out, "accelerator.json"), "w") as f:  # after every section: a timeout keeps it
      json.dump(report, f, indent=1)
  report["seconds"] = time.perf_counter() - started
  with open(os.path.join(args.out, "accelerator.json"), "w") as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(args.out, "accelerator.md"), "w") as f:
    f.write(text)
  print(text)
  return report


if __name__ == "__main__":
  main()
