"""``mixtral-jax plan``: the command line. Training plans are ``training``'s, ``--generate`` plans ``serving``'s."""

from __future__ import annotations

import math

from mixtral_jax.config import ATTENTION_IMPLS
from mixtral_jax.model import REMAT_POLICIES
from mixtral_jax.sharding.mesh import parse_mesh

from . import topology
from .serving import serve_main
from .training import train_main

plan_example = "mixtral-jax plan --preset mixtral-8x7b --mesh data=2,fsdp=4,expert=8 --batch 256 --seq 4096 --topology v5p-128"


EXAMPLES = ("examples:\n"
            "  mixtral-jax plan --preset mixtral-8x7b --mesh data=2,fsdp=4,expert=8 --batch 256 --seq 4096 "
            "--topology v5p-128\n"
            "  mixtral-jax plan --preset mixtral-8x7b --mesh expert=8 --batch 8 --seq 4096 --topology h100x8\n"
            "  mixtral-jax plan --preset mixtral-8x7b --mesh fsdp=8 --batch 8 --seq 16384 --device h200\n"
            "  mixtral-jax plan --generate --preset mixtral-8x7b --mesh expert=2 --batch 8 --context 32768 "
            "--device h200\n"
            "  mixtral-jax plan --generate --preset mixtral-8x7b --batch 8 --context 8192 --quantize int8 "
            "--prefill-chunk 2048 --device 70\n"
            "  mixtral-jax plan --preset mixtral-8x7b --lora 16 --base-quantize nf4 --dpo --batch 4 --seq 4096 "
            "--topology h100")


def plan_parser(p):
  """The `plan` subcommand's flags (train plans by default; --generate for serving)."""
  p.epilog = EXAMPLES
  p.add_argument("--preset", default="mixtral-8x7b", help="model preset (mixtral_jax.config.PRESETS)")
  p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4,expert=8 (default: all devices on data); "
                                              "dcn_data=2,fsdp=8,expert=8: data across slices (--topology 2xv5p-128)")
  p.add_argument("--batch", type=int, default=256, help="global sequences per optimizer step (serving: rows)")
  p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
  p.add_argument("--grad-accum", type=int, default=1, help="microbatches per step")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype")
  p.add_argument("--param-dtype", default="float32", help="master weight dtype (serving: bfloat16)")
  p.add_argument("--remat", default="full", choices=tuple(REMAT_POLICIES),
                 help="activation rematerialisation (mixtral_jax.model.REMAT_POLICIES): none (keep all), "
                      "save_projections (keep q/k/v/o, router and expert FFN products), dots (q/k/v/o and router only), "
                      "save_attn_moe_in (keep attention output and MoE input), offload (those two in pinned host memory), "
                      "offload_projections (attention output and expert FFN products in pinned host memory), "
                      "offload_gate_up (only the gate and up products there, the rest on the device), "
                      "full (recompute each layer)")
  p.add_argument("--capacity-factor", default="1.25", help="expert capacity factor, or 'none' for dropless")
  p.add_argument("--moe-impl", default="auto", help="auto | blocked | ragged | dense (dropless expert kernel)")
  p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                 help="attention implementation (MixtralConfig.attention_impl); auto picks by the mesh's platform "
                      "and the shapes")
  p.add_argument("--topology", default=None,
                 help="compile deviceless for this target: a Cloud TPU slice (v5p-128, v4-32, v5litepod-16, v6e-64) "
                      "or compiler topology (v5p:4x4x4), or N such slices joined by DCN (2xv5p-128), with libtpu; or NVIDIA GPUs as [hosts x]card[xGPUs] "
                      f"({', '.join(topology.GPU_CARDS)}: h100x8, 2xh100x8, h200x8), with the CUDA plugin")
  p.add_argument("--simulate", action="store_true",
                 help="compile for simulated CPU devices, as many as the mesh has (automatic on a CPU-only host)")
  p.add_argument("--device", default=None,
                 help="say whether the peak fits: h100 | h200 | v5p | v5e | v6e | v4 | a size in GiB "
                      "(default with --topology: that TPU or GPU)")
  p.add_argument("--generate", action="store_true",
                 help="plan serving instead of training: compile prefill and one decode step (bf16 weights, or "
                      "--quantize int8)")
  p.add_argument("--quantize", choices=("int8", "nf4"), default=None,
                 help="--generate: weight-only quantization (as serve/generate --quantize int8 | nf4)")
  p.add_argument("--context", type=int, default=None,
                 help="--generate: tokens of the prompt and KV cache (default --seq)")
  p.add_argument("--prefill-chunk", type=int, default=None,
                 help="--generate: prompt columns per prefill call, a power of two (default generate's, 2048); "
                      "prefill compiles generate's chunk program of batch x min(context, this) tokens")
  p.add_argument("--json", default=None, help="also write the figures to this JSON file")
  p.add_argument("--dump-hlo", default=None, metavar="FILE",
                 help="write the compiled program's optimised HLO text to FILE (check the collectives yourself)")
  p.add_argument("--lora", type=int, default=None, metavar="RANK",
                 help="compile the LoRA step of this rank (default targets) instead of full fine-tuning")
  p.add_argument("--base-quantize", choices=("int8", "nf4"), default=None,
                 help="--lora: the frozen base stored as int8 or nf4 (QLoRA), as lora.base_quantize in the run "
                      "config")
  p.add_argument("--dpo", action="store_true",
                 help="--lora: compile the DPO step (data.format: preference) instead of SFT's: --batch counts "
                      "pairs, each a chosen and a rejected row of --seq tokens (2 x batch rows), scored by the policy "
                      "forward and backward plus the reference forward with the adapters off")




def plan_main(args) -> int:
  count = math.prod(v for v in parse_mesh(args.mesh).values() if v > 0)
  if args.topology and args.simulate:
    raise ValueError("--topology compiles for that TPU slice or GPU host; drop --simulate")
  if getattr(args, "dpo", False) and args.generate:
    raise ValueError("--dpo plans the DPO training step, not serving: drop --generate")
  if getattr(args, "dpo", False) and args.lora is None:
    raise ValueError("--dpo plans the DPO training step, whose reference is the base with the adapters off: add "
                     "--lora RANK (e.g. --lora 16)")
  if args.generate:
    return serve_main(args, count)
  return train_main(args, count)
