"""LoRA step vs full fine-tuning step (and peft + transformers' LoRA step), bench-small on CPU: tokens/s
and peak resident memory, each variant in its own child process (so each peak RSS is its own), one run.

Config: the issue's bench-small (V 32000, D 512, L 4, 8/2 heads, F 1792, 8 experts, top-2), batch
8 x 256, fp32 compute (CPU; bf16 matmuls are emulated there), remat none. LoRA: rank 16, alpha 32, the
default targets q, k, v, o, w1, w2, w3 (per expert); the base frozen in the compute dtype, adapters +
AdamW in fp32. Full: every weight trained, fp32 master + AdamW. peft: transformers' MixtralForCausalLM with
peft 0.21 LoRA on the same targets (``target_parameters`` for the fused experts), torch AdamW.
Compile / warm-up steps excluded; medians of timed steps.

  python benchmarks/lora.py [--steps 6] [--batch 8] [--seq 256] [--skip-peft] [--skip-full] [--quantized]

``--quantized`` adds the QLoRA rows: the same LoRA step with ``lora.base_quantize`` nf4 and int8 (the base
dequantized per layer inside the scan), compared with the LoRA step on the unquantized base.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

RANK, ALPHA = 16, 32.0


def _batch(vocab, B, T):
  ids = np.random.default_rng(0).integers(0, vocab, (B, T + 1)).astype(np.int32)
  return ids[:, :-1], ids[:, 1:]


def ours(args, lora: bool, base_quantize: str | None = None):
  import jax

  from mixtral_jax.config import get_config
  from mixtral_jax.sharding.mesh import make_mesh
  from mixtral_jax.train import step as step_lib
  from mixtral_jax.train.config import TrainConfig

  cfg = get_config("bench-small")
  train = TrainConfig().override({"data.batch_size": args.batch, "data.seq_len": args.seq, "loss.ce_chunk": 64,
                                  "train.steps": 1000, "lora.rank": RANK if lora else None, "lora.alpha": ALPHA,
                                  "lora.base_quantize": base_quantize})
  mesh = make_mesh(None, devices=jax.devices()[:1])
  step_fn, _, _ = step_lib.build_train_step(cfg, train, mesh)
  state = step_lib.init_state(cfg, train, mesh)
  inputs, targets = _batch(cfg.vocab_size, args.batch, args.seq)
  shape = (1, args.batch, args.seq)
  batch = jax.device_put({"inputs": inputs.reshape(shape), "targets": targets.reshape(shape),
                          "weights": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
                          "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy()},
                         step_lib.batch_sharding(mesh))
  holder = {"state": state}
  trainable = sum(a.size for a in jax.tree.leaves(state.params))

  def run():
    holder["state"], metrics = step_fn(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
  return run, trainable


def peft_step(args):
  import peft
  import torch
  import transformers

  from mixtral_jax.config import get_config

  cfg = get_config("bench-small")
  torch.manual_seed(0)
  hf_cfg = transformers.MixtralConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "torch_dtype", "output_router_logits")},
                                      output_router_logits=True)
  model = peft.get_peft_model(transformers.MixtralForCausalLM(hf_cfg), peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
  inputs, targets = _batch(cfg.vocab_size, args.batch, args.seq)
  ids = torch.tensor(np.concatenate([inputs, targets[:, -1:]], axis=1), dtype=torch.long)

  def run():
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return run, sum(p.numel() for p in params)


def child(args) -> None:
  """Runs one variant, prints one JSON line: step times, trainable parameters, peak RSS."""
  fn, trainable = {"lora": lambda: ours(args, True), "full": lambda: ours(args, False),
                   "lora-nf4": lambda: ours(args, True, "nf4"), "lora-int8": lambda: ours(args, True, "int8"),
                   "peft": lambda: peft_step(args)}[args.child]()
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    fn()
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  print(json.dumps({"times": times, "trainable": int(trainable), "peak_rss": rss}))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--skip-peft", action="store_true")
  p.add_argument("--skip-full", action="store_true")
  p.add_argument("--quantized", action="store_true", help="also the LoRA step on an nf4 and an int8 base (QLoRA)")
  p.add_argument("--child", choices=("lora", "full", "peft", "lora-nf4", "lora-int8"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return child(args)
  variants = ([] if args.skip_full else ["full"]) + ["lora"] + (["lora-nf4", "lora-int8"] if args.quantized else []) \
      + ([] if args.skip_peft else ["peft"])
  tokens = args.batch * args.seq
  results = {}
  for v in variants:
    cmd = [sys.executable, __file__, "--child", v, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    results[v] = json.loads(out.strip().splitlines()[-1])
  print(f"bench-small, batch {args.batch} x {args.seq}, fp32, LoRA rank {RANK} on q,k,v,o,w1,w2,w3; medians of "
        f"{args.steps} steps after {args.warmup} warm-up")
  names = {"full": "mixtral-jax full", "lora": "mixtral-jax LoRA", "peft": "transformers+peft LoRA",
           "lora-nf4": "mixtral-jax LoRA, nf4 base", "lora-int8": "mixtral-jax LoRA, int8 base"}
  for v, r in results.items():
    med = statistics.median(r["times"])
    print(f"{names[v]:24s}: {med:.3f} s/step {tokens / med:8.0f} tokens/s  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB  "
          f"trainable {r['trainable']:,}  (steps: {', '.join(f'{x:.2f}' for x in r['times'])})")
  med = {v: statistics.median(r["times"]) for v, r in results.items()}
  if "full" in med:
    print(f"LoRA / full: tokens/s {med['full'] / med['lora']:.2f}x, peak RSS "
          f"{results['lora']['peak_rss'] / results['full']['peak_rss']:.2f}x")
  for q in ("lora-nf4", "lora-int8"):
    if q in med:
      print(f"{names[q]} / LoRA on the float base: tokens/s {med['lora'] / med[q]:.2f}x, peak RSS "
            f"{results[q]['peak_rss'] / results['lora']['peak_rss']:.2f}x")
  if "peft" in med:
    print(f"ours LoRA / transformers+peft LoRA: tokens/s {med['peft'] / med['lora']:.2f}x, peak RSS "
          f"{results['lora']['peak_rss'] / results['peft']['peak_rss']:.2f}x")


if __name__ == "__main__":
  main()
