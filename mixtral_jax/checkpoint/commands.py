"""``mixtral-jax demo``, ``convert`` and ``export`` (see ``mixtral_jax.cli`` for the dispatcher)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

DTYPES = ("float32", "bfloat16")


def _say(msg: str) -> None:
  print(msg, flush=True)


# ------------------------------------------------------------------------------------ demo

demo_example = "mixtral-jax demo --out /tmp/tiny-demo --format hf"


def demo_parser(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", help="directory to write the checkpoint to and keep (default: a temporary one)")
  p.add_argument("--format", choices=("orbax", "hf"), default="orbax",
                 help="save as our Orbax checkpoint or as Hugging Face safetensors")
  p.add_argument("--preset", default="tiny", help="model preset to build")
  p.add_argument("--seed", type=int, default=0, help="random initialisation seed")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def demo_main(args: argparse.Namespace) -> int:
  import numpy as np  # noqa: PLC0415 - keep `mixtral-jax --help` fast
  from flax import nnx  # noqa: PLC0415

  import mixtral_jax  # noqa: PLC0415
  from mixtral_jax import checkpoint  # noqa: PLC0415

  cfg = mixtral_jax.get_config(args.preset)
  total, active = mixtral_jax.param_counts(cfg)
  _say(f"[1/4] building the {args.preset!r} preset: {cfg.num_hidden_layers} layers, D={cfg.hidden_size}, "
       f"{cfg.num_local_experts} experts (top {cfg.num_experts_per_tok}), vocab {cfg.vocab_size}")
  t = time.perf_counter()
  model = mixtral_jax.create_model(cfg, seed=args.seed)
  _say(f"      parameters: {total:,} total, {active:,} active per token ({time.perf_counter() - t:.1f}s)")
  with tempfile.TemporaryDirectory(prefix="mixtral-jax-demo-") as scratch:
    out = args.out or os.path.join(scratch, "tiny")
    t = time.perf_counter()
    if args.format == "orbax":
      checkpoint.save(model, out, overwrite=args.overwrite)
    else:
      orbax_tmp = checkpoint.save(model, os.path.join(scratch, "orbax"))
      checkpoint.export(orbax_tmp, out, overwrite=args.overwrite)
    _say(f"[2/4] saved as {args.format} to {out} ({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    loaded = mixtral_jax.from_pretrained(out)
    _say(f"[3/4] loaded back through mixtral_jax.from_pretrained ({time.perf_counter() - t:.1f}s)")
    ids = np.array([[1, 415, 2936, 9060, 285, 1142, 461, 10575]], dtype=np.int32)
    forward = nnx.jit(lambda m, x: m(x))  # compiled once, shared by both models (same config)
    logits = np.asarray(forward(loaded, ids))
    same = np.array_equal(logits, np.asarray(forward(model, ids)))
    _say(f"[4/4] logits for tokens {ids[0].tolist()}: shape {list(logits.shape)} {logits.dtype}")
    _say(f"      last position, first 5 logits: {np.array2string(logits[0, -1, :5], precision=4)}")
    _say(f"      argmax per position: {logits[0].argmax(-1).tolist()}")
    _say(f"      identical to the in-memory model: {same}")
  if args.out:
    _say(f"checkpoint kept at {args.out}")
  return 0 if same else 1


# ------------------------------------------------------------------------------------ convert

convert_example = "mixtral-jax convert ~/Mixtral-8x7B-v0.1 ckpt/8x7b --dtype bfloat16"


def convert_parser(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", help="a Hugging Face directory or a Mistral consolidated directory")
  p.add_argument("dst", help="the Orbax checkpoint directory to create")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="parameter storage dtype of the output (default: the source's)")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  p.add_argument("--allow-nonfinite", action="store_true",
                 help="convert tensors holding NaN/Inf (normally an error naming the tensor), e.g. a deliberate test")


def convert_main(args: argparse.Namespace) -> int:
  from mixtral_jax.checkpoint import convert  # noqa: PLC0415

  t = time.perf_counter()
  convert(args.src, args.dst, overwrite=args.overwrite, param_dtype=args.dtype,
          allow_nonfinite=args.allow_nonfinite, progress=_say)
  _say(f"done in {time.perf_counter() - t:.1f}s")
  return 0


# ------------------------------------------------------------------------------------ export

export_example = ("mixtral-jax export runs/tiny hf/tiny --max-shard-size 500MB\n"
                  "mixtral-jax export runs/lora hf/lora-adapter --peft")


def export_parser(p: argparse.ArgumentParser) -> None:
  p.add_argument("ckpt", help="a mixtral-jax Orbax checkpoint, a training run directory, or one of its steps")
  p.add_argument("dst", help="the Hugging Face directory to create")
  p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the exported tensors (default: as stored)")
  p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 5GB or 500MB")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  lora = p.add_mutually_exclusive_group()
  lora.add_argument("--merge", action="store_true",
                    help="LoRA run: write its base with the adapters merged in, as Hugging Face safetensors")
  lora.add_argument("--peft", action="store_true",
                    help="LoRA run: write its adapters as a Hugging Face PEFT adapter for the base")
  p.add_argument("--base", help="LoRA run: the base checkpoint (default: the one the run recorded in lora.json)")


def export_main(args: argparse.Namespace) -> int:
  from mixtral_jax.checkpoint import export  # noqa: PLC0415
  from mixtral_jax.lora import run as lora_run  # noqa: PLC0415

  t = time.perf_counter()
  if args.merge or args.peft:
    from mixtral_jax.lora.export import export_lora  # noqa: PLC0415
    export_lora(args.ckpt, args.dst, merge=args.merge, base=args.base, overwrite=args.overwrite, dtype=args.dtype,
                max_shard_size=args.max_shard_size, progress=_say)
  elif lora_run.is_lora_run(args.ckpt):
    raise ValueError(f"{args.ckpt} is a LoRA run (adapters only); pass --merge for merged Hugging Face weights "
                     "or --peft for a PEFT adapter")
  else:
    export(args.ckpt, args.dst, overwrite=args.overwrite, dtype=args.dtype, max_shard_size=args.max_shard_size,
           progress=_say)
  _say(f"done in {time.perf_counter() - t:.1f}s")
  return 0
