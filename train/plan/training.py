"""``mixtral-jax plan``: compile a preset's real train step ahead of time on a mesh, from shapes alone.

  mixtral-jax plan --preset mixtral-8x7b --mesh data=2,fsdp=4,expert=8 --batch 256 --seq 4096 --topology v5p-128
  mixtral-jax plan --preset mixtral-8x7b --mesh fsdp=8 --batch 8 --seq 16384 --device h200
  mixtral-jax plan --preset mixtral-8x7b --lora 16 --base-quantize nf4 --dpo --batch 4 --seq 4096 --topology h100

The step is the training engineer's (``mixtral_jax.train.step.build_train_step``), lowered from abstract
``ShapeDtypeStruct``s and compiled for the mesh's devices; no weight is allocated. The devices are:

* ``--topology v5p-128`` (``topology``): the TPU slice's devices from libtpu, so the real TPU
  compiler compiles the step on this host, with TPU kernels and collectives (kernel choices follow the
  mesh's platform, ``sharding.mesh.current_platform``). Its RESOURCE_EXHAUSTED is read as a verdict.
* ``--topology h100x8`` (``2xh100x8``, ``h200x8``, ...): compile-only NVIDIA devices from the CUDA
  plugin, so XLA:GPU compiles the step deviceless, with GPU kernels and async collectives.
* otherwise this host's devices; when the mesh needs more than exist and JAX has not started on an
  accelerator, simulated CPU devices (``--simulate`` forces that). The figures then describe the
  program each device of the target mesh would run; CPU layouts and fusion differ a little from
  TPU/GPU ones (bf16 all-to-alls travel as f32, for one).

Per device it prints, each beside its analytic expectation:

* parameter and optimizer-state bytes: the compiled step's argument shards (the executable's input
  shardings) against count x dtype size / shards from the logical-axis table;
* temporaries (activations, MoE buffers, gradients in flight) from ``compiled.memory_analysis()``,
  and the peak: arguments + outputs - donated + temporaries;
* FLOPs per step from the HLO (``hlo_stats``: dots and convolutions times loop trip counts),
  and ``compiled.cost_analysis()``'s own figure, which counts each loop body once;
* all-to-all bytes per step, summed the same way over the HLO's ``all-to-all`` instructions.

With ``--device`` it says whether the peak fits that device and, when not, what to change.
``--generate`` plans serving instead (``serving``); the command line is ``commands``.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from flax import nnx

from mixtral_jax import lora as lora_lib
from mixtral_jax import routing
from mixtral_jax.config import MixtralConfig
from mixtral_jax.layers import LOGICAL_AXES
from mixtral_jax.model import Mixtral, remat_policy
from mixtral_jax.params import abstract_model
from mixtral_jax.sharding.mesh import format_mesh, make_mesh
from mixtral_jax.sharding.rules import logical_to_spec

from . import dcn, topology
from .compiling import (GiB, compile_or_verdict, fit_lines, header, kernel_lines, model_config,
                        shard_bytes, target_devices)

# ------------------------------------------------------------------------------------ analytic side


def _shards(axes, mesh) -> int:
  spec = logical_to_spec(axes, mesh)
  names = [n for part in spec if part is not None for n in (part if isinstance(part, tuple) else (part,))]
  return math.prod(mesh.shape[n] for n in names)


def _state_bytes(state, mesh, itemsize: int | None) -> float:
  """Bytes per device of ``state``'s leaves, each ``itemsize`` bytes (None: the leaf's own dtype)."""
  return sum(math.prod(var.shape) * (itemsize or np.dtype(var.dtype).itemsize)
             / _shards(var.get_metadata()[LOGICAL_AXES], mesh) for _, var in nnx.to_flat_state(state))


def _lora_states(cfg: MixtralConfig, lora):
  """(abstract adapters, abstract frozen base) of a LoRA model, split as the train step splits them."""
  from mixtral_jax.train.step import base_config  # noqa: PLC0415

  def build():
    model = Mixtral(base_config(cfg, lora), rngs=nnx.Rngs(0), lora_cfg=lora)
    if lora.base_quantize is None:
      return model
    from mixtral_jax.inference.quantize import quantize  # noqa: PLC0415
    return quantize(model, lora.base_quantize)

  _, adapters, frozen = nnx.split(nnx.eval_shape(build), lora_lib.LoRAParam, ...)
  return adapters, frozen


def analytic(cfg: MixtralConfig, mesh, batch: int, seq: int, grad_accum: int, lora=None, dpo: bool = False) -> dict:
  """Per-device expectations from the config, the mesh and the logical-axis table alone.

  Full fine-tuning: params in ``param_dtype`` with AdamW's two moments and a gradient each; every
  weight matmul costs 3x its forward (forward, input gradient, weight gradient). LoRA (``lora``, a
  ``LoraSection``): the frozen base in the compute dtype with no gradient and no optimizer state, fp32
  adapters with AdamW; a base matmul costs 2x its forward (no weight gradient), an adapter's 3x.
  DPO (``dpo``, LoRA only): ``batch`` counts pairs, each a chosen and a rejected row of ``seq`` tokens,
  so the LoRA step runs on ``2 * batch`` rows; the reference forward (adapters off) adds one forward of
  those rows, adapters included (they are zeros, still multiplied inside the layer scan), and no backward."""
  if dpo and lora is None:
    raise ValueError("DPO takes its reference from the base with the adapters off: give the LoRA section (--lora RANK)")
  if dpo:
    batch = 2 * batch  # rows: every pair's chosen row, then its rejected row
  cbytes = np.dtype(cfg.dtype).itemsize
  params, base, trained = _param_bytes(cfg, mesh, lora)
  D, F, E, k, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                   cfg.num_hidden_layers)
  N, H = cfg.num_attention_heads, cfg.head_size
  devices = mesh.size
  batch_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
  tp = mesh.shape["tensor"]
  micro_local = batch // grad_accum // batch_shards  # sequences per device per microbatch
  n_local = micro_local * seq  # tokens per device per microbatch
  C = routing.capacity(n_local, k, E, cfg.capacity_factor)
  routed = E * C / n_local  # expert rows computed per token: cf*k when dropping, k when dropless
  if cfg.capacity_factor is None:
    routed = k

  attention = attention_choice(cfg, mesh, seq)
  block = min(cfg.attention_block, seq)
  # Keys each query is scored against: all T for dense (masked, not skipped); the kernels skip the
  # blocks above the diagonal, about (T + block) / 2 on average.
  keys = seq if attention == "dense" else min(seq, (seq + block) / 2)
  passes = 3 + (cfg.remat == "full")  # backward is two forwards; full remat recomputes the forward
  reference = _reference_flops(cfg, batch * seq, keys, routed, lora) if dpo else 0.0
  flops = _step_flops(cfg, batch * seq, keys, routed, passes, lora) + reference

  remat_saved = L * micro_local * seq * D * cbytes  # the residual stream entering each layer
  # One layer's f32 attention scores: [T, S] per head for dense, a [T, block] strip for the kernels.
  scores = micro_local * max(N // tp, 1) * seq * (seq if attention == "dense" else block) * 4
  moe = E * C * D * cbytes * 2 + (E // mesh.shape["expert"]) * mesh.shape["expert"] * C * 3 * (F // tp) * cbytes
  a2a_fwd = E * C * D * cbytes * 2 if mesh.shape["expert"] > 1 else 0  # dispatch and return, one layer
  return {
      "param_bytes": params,  # LoRA: frozen base + adapters
      "base_bytes": base,
      "opt_bytes": 2 * trained,  # AdamW: mu and nu like the trained params
      "temp_bytes": 2 * trained + remat_saved + scores + moe,  # gradients and the clipped update, then activations
      "flops": flops / devices,
      "all_to_all_bytes": a2a_fwd * L * grad_accum * (passes - 1),  # fwd, remat fwd, and the transposes
      "a2a_per_token_layer": 2 * k * D * cbytes * (cfg.capacity_factor or E / k),
      "tokens_per_device": n_local * grad_accum,
      "attention": attention,
      # one forward pass of the scores and weighted values, per device (what a kernel hides from HLO)
      "attention_forward_flops": batch * seq * L * 2 * 2 * N * H * keys / devices,
      "reference_forward_flops": reference / devices,
  }


KERNEL_ATTENTION = ("splash", "cudnn", "flash")  # custom calls: their FLOPs are not in the HLO count


def _param_bytes(cfg: MixtralConfig, mesh, lora) -> tuple[float, float, float]:
  """Per device: (all parameters, the frozen base (0 without LoRA), the trained ones). Full fine-tuning
  trains everything in ``param_dtype``; LoRA freezes the base in the compute dtype (or its quantized
  form's codes and scales) and trains fp32 adapters."""
  if lora is None:
    trained = _state_bytes(nnx.state(abstract_model(cfg), nnx.Param), mesh, np.dtype(cfg.param_dtype).itemsize)
    return trained, 0.0, trained
  adapters, frozen = _lora_states(cfg, lora)
  base = _state_bytes(frozen, mesh, None)
  trained = _state_bytes(adapters, mesh, 4)
  return base + trained, base, trained


def _reference_flops(cfg: MixtralConfig, tokens: int, keys: float, routed: float, lora) -> float:
  """The DPO reference forward over ``tokens`` tokens: no gradient, so neither a backward nor a remat
  recompute; the (zeroed) adapters are still multiplied inside the layer scan."""
  from mixtral_jax.lora.spec import adapter_params  # noqa: PLC0415
  return _step_flops(cfg, tokens, keys, routed, 1, None) + tokens * 2 * adapter_params(cfg, lora, active=True)


def _step_flops(cfg: MixtralConfig, tokens: int, keys: float, routed: float, passes: int, lora) -> float:
  """FLOPs of one step over ``tokens`` tokens, all devices: the forward (projections, attention scores
  over ``keys`` keys per query, router, ``routed`` expert rows per token, LM head) times ``passes``;
  with LoRA the frozen weight matmuls lose their weight-gradient pass and the adapters add theirs."""
  D, F, E, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_hidden_layers, cfg.vocab_size
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
  per_token_layer = (2 * D * (N * H + 2 * K * H) + 2 * N * H * D  # q, k, v, o projections
                     + 2 * 2 * N * H * keys  # scores and weighted values
                     + 2 * D * E  # router
                     + routed * 2 * 3 * D * F)  # expert FFNs
  forward = tokens * (L * per_token_layer + 2 * D * V)
  if lora is None:
    return forward * passes
  from mixtral_jax.lora.spec import adapter_params  # noqa: PLC0415
  weights = forward - tokens * L * 2 * 2 * N * H * keys  # all but the scores
  return forward * passes - weights + tokens * 2 * adapter_params(cfg, lora, active=True) * passes


def attention_choice(cfg: MixtralConfig, mesh, seq: int) -> str:
  """The attention implementation the train step will use (``attention_impl`` resolved for the mesh's
  platform and a packed training batch)."""
  from mixtral_jax.attn.select import choose  # noqa: PLC0415

  platform = mesh.devices.flat[0].platform
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  try:
    return choose(cfg.attention_impl, platform=platform, T=seq, S=seq, head_dim=cfg.head_size,
                  dtype=np.dtype(cfg.dtype), index_aligned=True, packed=True, padded=True)[0]
  except ValueError:
    return cfg.attention_impl


def live_key_blocks(seq: int, block: int, window: int | None) -> float:
  """Key blocks a query block visits in blockwise attention, on average, for one unpacked row whose
  positions are its indices (``attn.mask.live_blocks``: causal, and within ``window`` when set)."""
  n = -(-seq // block)
  live = sum(1 for i in range(n) for j in range(i + 1)
             if window is None or i * block - (j * block + block - 1) < window)
  return live / n


def scaled_loop_flops(figures: dict, cfg: MixtralConfig, mesh, seq: int) -> dict:
  """FLOPs with blockwise attention's data-dependent key-block loops counted by their expected trips.

  ``hlo_stats`` counts a loop whose trip count is data once (``unknown_trip_flops``). In the train step
  those loops are blockwise attention's (forward, remat forward, backward), unless the dropless
  ``blocked`` expert kernel adds its own; then nothing is scaled. Returns the updated figures."""
  from mixtral_jax.experts import resolve_impl  # noqa: PLC0415

  platform = mesh.devices.flat[0].platform
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  blocked = cfg.capacity_factor is None and resolve_impl(cfg.moe_impl, platform) == "blocked"
  if not figures["unknown_trip_loops"] or blocked or attention_choice(cfg, mesh, seq) != "blockwise":
    return {}
  trips = live_key_blocks(seq, min(cfg.attention_block, seq), cfg.sliding_window)
  return {"flops_loops_once": figures["flops"], "unknown_trip_scale": trips,
          "flops": figures["flops"] + figures["unknown_trip_flops"] * (trips - 1)}


def plan(cfg: MixtralConfig, mesh, *, batch: int, seq: int, grad_accum: int = 1, lora_rank: int | None = None,
         base_quantize: str | None = None, dpo: bool = False, dump_hlo: str | None = None) -> dict:
  """Compiles the train step for ``mesh`` and returns the compiled and analytic figures per device
  (``lora_rank``: the LoRA step, default targets, frozen base in the compute dtype, or stored as
  ``base_quantize`` int8 / nf4; ``dpo``: the DPO step of the run config's ``data.format: preference``
  on ``batch`` pairs of two ``seq``-token rows, policy forward and backward plus the reference forward).
  On a mesh over several slices, also the bytes per step that cross DCN against the ideal (``dcn``)."""
  from mixtral_jax.train.config import TrainConfig  # noqa: PLC0415
  from mixtral_jax.train.step import build_train_step  # noqa: PLC0415

  if dpo and lora_rank is None:
    raise ValueError("--dpo compiles the DPO step, whose reference is the base with the adapters off: add --lora RANK "
                     "(e.g. --lora 16)")
  train_cfg = TrainConfig().override({"data.batch_size": batch, "data.seq_len": seq,
                                      "optimizer.grad_accum": grad_accum, "lora.rank": lora_rank,
                                      "lora.base_quantize": base_quantize,
                                      "data.format": "preference" if dpo else "text"})
  if lora_rank is not None:  # LoRA: checked before compiling
    from mixtral_jax.lora import validate  # noqa: PLC0415
    validate(train_cfg.lora, cfg)
  t0 = time.perf_counter()
  step_fn, abs_state, abs_batch = build_train_step(cfg, train_cfg, mesh)
  with jax.set_mesh(mesh):  # kernels that need a concrete mesh (shard_map'd Pallas) see the target's
    lowered = step_fn.lower(abs_state, abs_batch)
  _, figures = compile_or_verdict(lowered, shard_bytes(abs_state) + shard_bytes(abs_batch), dump_hlo)
  if "flops" in figures:
    figures.update(scaled_loop_flops(figures, cfg, mesh, seq))
  base = 0.0 if abs_state.base is None else shard_bytes(abs_state.base)
  slices = dcn.partition_slices(mesh)
  multi = {}
  if len(set(slices)) > 1 and "collectives" in figures:
    traffic = dcn.dcn_traffic(figures["collectives"], slices, figures.get("num_partitions"))
    ideal = shard_bytes(abs_state.params)  # gradients reduced in the parameters' dtype
    ideal_compute = ideal * np.dtype(cfg.dtype).itemsize / np.dtype(cfg.param_dtype).itemsize
    multi = {"dcn_bytes": traffic["dcn_bytes"], "dcn_ideal_bytes": ideal,
             "dcn_ideal_compute_dtype_bytes": ideal_compute, "dcn_ops": traffic["ops"], "partition_slices": slices}
  figures.pop("collectives", None)  # per-instruction detail: --dump-hlo has it all
  lora = train_cfg.lora if lora_rank is not None else None
  expected = analytic(cfg, mesh, batch, seq, grad_accum, lora, dpo)
  no_remat = _recompute_factors(figures, expected, analytic(cfg.replace(remat="none"), mesh, batch, seq, grad_accum,
                                                             lora, dpo)["flops"])
  return {**multi,
      "compiled": {"param_bytes": shard_bytes(abs_state.params) + base, "base_bytes": base,
                   "opt_bytes": shard_bytes(abs_state.opt_state), **figures},
      "analytic": {**expected, "flops_no_remat": no_remat},
      "compile_seconds": time.perf_counter() - t0,
  }


def _recompute_factors(figures: dict, expected: dict, no_remat: float) -> float:
  """Adds the recompute factor to ``figures``: compiled FLOPs over the analytic FLOPs of the same step
  without remat (which the analytic count matches within a few percent; compiling a second, no-remat
  program would double the compile time, and at full size it often does not fit). With an attention
  kernel, also the factor outside it: the kernel's FLOPs (forward and backward: 3 forward passes' worth)
  are in neither the compiled count nor, then, its recompute. Returns ``no_remat``."""
  if "flops" in figures and no_remat:
    figures["recompute_factor"] = figures["flops"] / no_remat
    if expected["attention"] in KERNEL_ATTENTION and figures.get("kernels"):
      figures["recompute_factor_outside_attention"] = figures["flops"] / (no_remat - 3 * expected["attention_forward_flops"])
  return no_remat


def train_main(args, count: int) -> int:
  """``mixtral-jax plan`` for training: compile, then print each figure beside its expectation."""
  cfg = model_config(args)
  devices = target_devices(args, count)
  remat_policy(cfg.remat, devices)  # offload needs pinned host memory on the target
  mesh = make_mesh(args.mesh, devices=devices, num_experts=cfg.num_local_experts)
  dpo = getattr(args, "dpo", False)
  out = plan(cfg, mesh, batch=args.batch, seq=args.seq, grad_accum=args.grad_accum, lora_rank=args.lora,
             base_quantize=getattr(args, "base_quantize", None), dpo=dpo, dump_hlo=args.dump_hlo)
  c, a = out["compiled"], out["analytic"]
  rows = f"DPO, batch {args.batch} pairs ({2 * args.batch} rows) x {args.seq}" if dpo else f"batch {args.batch} x {args.seq}"
  print(header(args, cfg, mesh, f"{rows}, {args.grad_accum} microbatch(es), remat {cfg.remat}")
        + f"; compiled in {out['compile_seconds']:.1f} s")
  device = topology.device_memory(args.device, list(mesh.devices.flat))
  tips = topology.advice(c["peak_bytes"] / GiB, device[1], mesh_sizes=dict(mesh.shape), remat=cfg.remat,
                         grad_accum=args.grad_accum, batch=args.batch) if device else []
  if c.get("oom"):
    _print_oom(c, a)
  else:
    _print_table(out, cfg)
    _print_notes(c, cfg, mesh)
  lines, verdict = fit_lines(c["peak_bytes"], device, tips) if c.get("memory_space") != "host" else ([], None)
  for line in lines:
    print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"preset": args.preset, "mesh": format_mesh(mesh), "topology": args.topology,
                 "device": verdict, "lora_rank": args.lora, "base_quantize": getattr(args, "base_quantize", None),
                 "dpo": dpo, **out}, f, indent=2)
  return 0


def _print_oom(c: dict, a: dict) -> None:
  """What the TPU compiler refused, beside the analytic parameters, optimizer state and temporaries."""
  if c.get("memory_space") == "host":
    print(f"does not fit: the offloaded activations need {c['host_temp_bytes'] / GiB:.2f} GiB of pinned host memory "
          f"per device, of {c['host_available_bytes'] / GiB:.2f} GiB the TPU compiler allows; offload less (a policy "
          "that keeps fewer tensors, or fewer tokens per device per microbatch)")
    print(f"  compiler: {c['message']}")
    return
  print(f"does not fit: the TPU compiler needs {c['temp_bytes'] / GiB:.2f} GiB of temporaries, plus "
        f"{(c['peak_bytes'] - c['temp_bytes']) / GiB:.2f} GiB of arguments, of {c['available_bytes'] / GiB:.2f} GiB "
        f"HBM per device")
  print(f"  compiler: {c['message']}")
  print(f"  analytic: parameters {a['param_bytes'] / GiB:.2f} GiB, optimizer state {a['opt_bytes'] / GiB:.2f} GiB, "
        f"temporaries {a['temp_bytes'] / GiB:.2f} GiB per device")


def _print_table(out: dict, cfg: MixtralConfig) -> None:
  """The compiled figures beside the analytic ones, the peak and recompute factor, and DCN traffic."""
  c, a = out["compiled"], out["analytic"]
  print(f"per device{'':22}{'compiled':>12}{'analytic':>12}")
  rows = [("parameters (GiB)", c["param_bytes"] / GiB, a["param_bytes"] / GiB),
          ("optimizer state (GiB)", c["opt_bytes"] / GiB, a["opt_bytes"] / GiB),
          ("temporaries (GiB)", c["temp_bytes"] / GiB, a["temp_bytes"] / GiB),
          ("TFLOPs per step", c["flops"] / 1e12, a["flops"] / 1e12),
          ("all-to-all GiB per step", c["all_to_all_bytes"] / GiB, a["all_to_all_bytes"] / GiB)]
  for name, got, want in rows:
    print(f"  {name:<30}{got:12.3f}{want:12.3f}")
  if a["reference_forward_flops"]:
    print(f"  of which the DPO reference forward (adapters off, no backward): {a['reference_forward_flops'] / 1e12:.3f} "
          "TFLOPs analytic")
  print(f"  peak (arguments + outputs - donated + temporaries): {c['peak_bytes'] / GiB:.2f} GiB; recompute "
        f"factor {c.get('recompute_factor', float('nan')):.3f}x (compiled FLOPs / analytic FLOPs without remat)")
  if c.get("host_temp_bytes"):
    print(f"  pinned host memory per device (offloaded activations, not in the peak): "
          f"{c['host_temp_bytes'] / GiB:.2f} GiB")
  if "recompute_factor_outside_attention" in c:
    print(f"  recompute factor outside the {a['attention']} attention kernel (whose FLOPs the HLO count lacks): "
          f"{c['recompute_factor_outside_attention']:.3f}x")
  if "dcn_bytes" in out:
    for line in dcn.dcn_lines({"dcn_bytes": out["dcn_bytes"], "ops": out["dcn_ops"]}, out["dcn_ideal_bytes"],
                              out["dcn_ideal_compute_dtype_bytes"], cfg.param_dtype, cfg.dtype):
      print(line)


def _print_notes(c: dict, cfg: MixtralConfig, mesh) -> None:
  """What to know reading the table: XLA's own FLOP count, ragged all-to-alls, kernels, and the
  simulation's known differences from TPU/GPU programs."""
  if c["cost_analysis_flops"] is not None:
    print(f"  XLA cost_analysis: {c['cost_analysis_flops'] / 1e12:.3f} TFLOPs (each loop body counted once: the "
          f"layer scan, microbatch scan and loss chunks run many times; the row above weights them)")
  if c["ragged_all_to_all_ops"]:
    print(f"  ragged-all-to-all: {c['ragged_all_to_all_ops']} per step, worst-case buffers "
          f"{c['ragged_all_to_all_buffer_bytes'] / GiB:.3f} GiB (the traffic itself follows the routing)")
  for line in kernel_lines(c, ragged=False):  # the ragged all-to-all line above has the count
    print(line)
  print("  (analytic temporaries: gradients and update plus a rough sum of saved residuals, one layer's attention "
        "scores and MoE buffers; all-to-all counts forward, remat and backward exchanges)")
  if mesh.devices.flat[0].platform == "cpu" and cfg.dtype == "bfloat16" and c["all_to_all_bytes"]:
    print("  note: XLA:CPU carries bfloat16 all-to-alls as float32, so the compiled bytes here are twice "
          "what TPU/GPU send")
  if "while-loop-invariant-code-motion" in os.environ.get("XLA_FLAGS", ""):
    print("  note: simulated with XLA:CPU's loop-invariant code motion off (it hoists f32 copies of whole "
          "stacked bf16 operands out of the layer scan, which GPU/TPU programs do not hold)")
  if c.get("unknown_trip_scale"):
    print(f"  note: {c['unknown_trip_loops']} blockwise-attention loop(s) over live key blocks counted at "
          f"{c['unknown_trip_scale']:.2f} trips, the average for causal rows of one document each")
  elif c["unknown_trip_loops"]:
    print(f"  note: {c['unknown_trip_loops']} loop(s) with data-dependent trip counts were counted once")
