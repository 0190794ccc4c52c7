"""``mixtral-jax plan``: compile a preset's real train step ahead of time on a mesh, from shapes alone.

  mixtral-jax plan --preset mixtral-8x7b --mesh data=2,fsdp=4,expert=8 --batch 256 --seq 4096 --simulate

The step is the training engineer's (``mixtral_jax.train.step.build_train_step``), lowered from abstract
``ShapeDtypeStruct``s and compiled for the mesh's devices; no weight is allocated. ``--simulate`` uses
that many simulated CPU devices when the real ones are fewer (the figures then describe the program
each device of the target mesh would run; CPU layouts and fusion differ a little from TPU/GPU ones).

Per device it prints, each beside its analytic expectation:

* parameter and optimizer-state bytes: the compiled step's argument shards (the executable's input
  shardings) against count x dtype size / shards from the logical-axis table;
* temporaries (activations, MoE buffers, gradients in flight) from ``compiled.memory_analysis()``;
* FLOPs per step: every ``dot`` of the optimised HLO, 2 x output size x contracted size, multiplied by
  the trip counts of the loops around it (XLA's own ``cost_analysis`` counts a loop body once);
* all-to-all bytes per step, summed the same way over the HLO's ``all-to-all`` instructions.

Loops whose trip count depends on data (the blocked dropless kernel) are counted once and reported, so
FLOPs are exact for the dropping (capacity) dispatch, the default here.
"""

from __future__ import annotations

import json
import math
import re
import time

import jax
import numpy as np
from flax import nnx

from mixtral_jax import routing
from mixtral_jax.config import MixtralConfig, get_config
from mixtral_jax.layers import LOGICAL_AXES
from mixtral_jax.params import abstract_model
from mixtral_jax.sharding.mesh import format_mesh, make_mesh
from mixtral_jax.sharding.rules import logical_to_spec

GiB = 2**30

# ------------------------------------------------------------------------------------ HLO text

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _arrays(text: str):
  """(dtype, dims) of every array type written in ``text``."""
  return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(text)]


def _nbytes(arrays) -> int:
  return sum(_DTYPE_BYTES.get(d, 1 if d.startswith("f8") else 4) * math.prod(dims) for d, dims in arrays)


def _split_type(rest: str) -> tuple[str, str]:
  """'f32[2,3]{1,0} dot(...)' or '(f32[2], s32[]) tuple(...)' -> (type text, the rest)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def hlo_stats(hlo: str) -> dict:
  """Trip-count-weighted FLOPs of ``dot`` and bytes of ``all-to-all`` in an optimised HLO module's text.

  Returns {flops, all_to_all_bytes, all_to_all_ops, unknown_trip_loops}. A computation's weight is the
  sum over its call sites of the caller's weight times the site's trip count (``known_trip_count`` of a
  ``while``; 1 for fusions, calls and branches, so branches count as if all ran).
  """
  shapes: dict[str, list] = {}
  instrs = []  # (computation, op, type text, the rest of the line)
  edges: dict[str, list[tuple[str, int]]] = {}
  entry, comp, unknown = None, None, 0
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      comp = header.group(2)
      entry = comp if header.group(1) else entry
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    type_text, rest = _split_type(line[m.end():])
    op = rest.split("(", 1)[0].strip()
    shapes[m.group(1)] = _arrays(type_text)
    instrs.append((comp, op, type_text, rest))
    trip = 1
    if op == "while":
      t = _TRIP.search(rest)
      trip = int(t.group(1)) if t else 1
      unknown += t is None
    for kind, callee in _CALLEES.findall(rest):
      edges.setdefault(callee, []).append((comp, trip if kind == "body" else 1))
    for group in _BRANCHES.findall(rest):
      for callee in group.split(","):
        edges.setdefault(callee.strip().lstrip("%"), []).append((comp, 1))

  weights: dict[str, int] = {}

  def weight(c: str) -> int:
    if c not in weights:
      weights[c] = 1 if c == entry else 0  # 0 first: a cycle (none in HLO) cannot recurse forever
      weights[c] = (1 if c == entry else 0) + sum(weight(p) * n for p, n in edges.get(c, ()))
    return weights[c]

  flops = a2a_bytes = a2a_ops = 0
  for comp, op, type_text, rest in instrs:
    if op == "dot":
      operands = rest[rest.index("(") + 1:]
      first = operands.split(",")[0].strip()
      lhs = _arrays(first) or shapes.get(first.split()[-1].lstrip("%"), [])
      dims = [int(d) for d in re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest).group(1).split(",") if d]
      contracted = math.prod(lhs[0][1][d] for d in dims) if lhs else 0
      flops += weight(comp) * 2 * math.prod(_arrays(type_text)[0][1]) * contracted
    elif op in ("all-to-all", "all-to-all-start"):
      a2a_bytes += weight(comp) * _nbytes(_arrays(type_text))
      a2a_ops += weight(comp)
  return {"flops": flops, "all_to_all_bytes": a2a_bytes, "all_to_all_ops": a2a_ops, "unknown_trip_loops": unknown}


# ------------------------------------------------------------------------------------ analytic side


def _shards(axes, mesh) -> int:
  spec = logical_to_spec(axes, mesh)
  names = [n for part in spec if part is not None for n in (part if isinstance(part, tuple) else (part,))]
  return math.prod(mesh.shape[n] for n in names)


def analytic(cfg: MixtralConfig, mesh, batch: int, seq: int, grad_accum: int) -> dict:
  """Per-device expectations from the config, the mesh and the logical-axis table alone."""
  pbytes = np.dtype(cfg.param_dtype).itemsize
  cbytes = np.dtype(cfg.dtype).itemsize
  params = 0.0
  for _, var in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
    params += math.prod(var.shape) * pbytes / _shards(var.get_metadata()[LOGICAL_AXES], mesh)

  D, F, E, k, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                      cfg.num_hidden_layers, cfg.vocab_size)
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
  devices = mesh.size
  batch_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
  tp = mesh.shape["tensor"]
  micro_local = batch // grad_accum // batch_shards  # sequences per device per microbatch
  n_local = micro_local * seq  # tokens per device per microbatch
  C = routing.capacity(n_local, k, E, cfg.capacity_factor)
  routed = E * C / n_local  # expert rows computed per token: cf*k when dropping, k when dropless
  if cfg.capacity_factor is None:
    routed = k

  per_token_layer = (2 * D * (N * H + 2 * K * H) + 2 * N * H * D  # q, k, v, o projections
                     + 2 * 2 * N * H * seq  # scores and weighted values over all T keys (masked, not skipped)
                     + 2 * D * E  # router
                     + routed * 2 * 3 * D * F)  # expert FFNs
  forward = batch * seq * (L * per_token_layer + 2 * D * V)
  passes = 3 + (cfg.remat == "full")  # backward is two forwards; full remat recomputes the forward

  remat_saved = L * micro_local * seq * D * cbytes  # the residual stream entering each layer
  scores = micro_local * max(N // tp, 1) * seq * seq * 4  # one layer's f32 attention scores
  moe = E * C * D * cbytes * 2 + (E // mesh.shape["expert"]) * mesh.shape["expert"] * C * 3 * (F // tp) * cbytes
  a2a_fwd = E * C * D * cbytes * 2 if mesh.shape["expert"] > 1 else 0  # dispatch and return, one layer
  return {
      "param_bytes": params,
      "opt_bytes": 2 * params,  # AdamW: mu and nu like the params
      "temp_bytes": 2 * params + remat_saved + scores + moe,  # gradients and the clipped update, then activations
      "flops": forward * passes / devices,
      "all_to_all_bytes": a2a_fwd * L * grad_accum * (passes - 1),  # fwd, remat fwd, and the transposes
      "a2a_per_token_layer": 2 * k * D * cbytes * (cfg.capacity_factor or E / k),
      "tokens_per_device": n_local * grad_accum,
  }


# ------------------------------------------------------------------------------------ the command


def _shard_bytes(tree) -> float:
  return float(sum(math.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
                   for s in jax.tree.leaves(tree)))


def plan(cfg: MixtralConfig, mesh, *, batch: int, seq: int, grad_accum: int = 1, lora_rank: int | None = None) -> dict:
  """Compiles the train step for ``mesh`` and returns the compiled and analytic figures per device
  (``lora_rank``: the LoRA step, default targets, frozen base in the compute dtype)."""
  from mixtral_jax.train.config import TrainConfig  # noqa: PLC0415
  from mixtral_jax.train.step import build_train_step  # noqa: PLC0415

  train_cfg = TrainConfig().override({"data.batch_size": batch, "data.seq_len": seq,
                                      "optimizer.grad_accum": grad_accum, "lora.rank": lora_rank})
  if lora_rank is not None:  # LoRA: checked before compiling
    from mixtral_jax.lora import validate  # noqa: PLC0415
    validate(train_cfg.lora, cfg)
  t0 = time.perf_counter()
  step_fn, abs_state, abs_batch = build_train_step(cfg, train_cfg, mesh)
  compiled = step_fn.lower(abs_state, abs_batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  stats = hlo_stats(compiled.as_text())
  return {
      "compiled": {"param_bytes": _shard_bytes(abs_state.params), "opt_bytes": _shard_bytes(abs_state.opt_state),
                   "temp_bytes": float(mem.temp_size_in_bytes), "argument_bytes": float(mem.argument_size_in_bytes),
                   "output_bytes": float(mem.output_size_in_bytes), "alias_bytes": float(mem.alias_size_in_bytes),
                   **stats},
      "analytic": analytic(cfg, mesh, batch, seq, grad_accum),
      "compile_seconds": seconds,
  }


def plan_parser(p):
  p.add_argument("--preset", default="mixtral-8x7b", help="model preset (mixtral_jax.config.PRESETS)")
  p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4,expert=8 (default: all devices on data)")
  p.add_argument("--batch", type=int, default=256, help="global sequences per optimizer step")
  p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
  p.add_argument("--grad-accum", type=int, default=1, help="microbatches per step")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype")
  p.add_argument("--param-dtype", default="float32", help="master weight dtype")
  p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
  p.add_argument("--capacity-factor", default="1.25", help="expert capacity factor, or 'none' for dropless")
  p.add_argument("--simulate", action="store_true",
                 help="compile for simulated CPU devices, as many as the mesh has (set before JAX starts)")
  p.add_argument("--json", default=None, help="also write the figures to this JSON file")
  p.add_argument("--lora", type=int, default=None, metavar="RANK",
                 help="compile the LoRA step of this rank (default targets) instead of full fine-tuning")


def plan_main(args) -> int:
  cf = None if str(args.capacity_factor).lower() in ("none", "null", "dropless") else float(args.capacity_factor)
  cfg = get_config(args.preset, dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                   capacity_factor=cf)
  if args.simulate:
    from mixtral_jax.sharding.mesh import parse_mesh  # noqa: PLC0415
    count = math.prod(v for v in parse_mesh(args.mesh).values() if v > 0)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  mesh = make_mesh(args.mesh, num_experts=cfg.num_local_experts)
  out = plan(cfg, mesh, batch=args.batch, seq=args.seq, grad_accum=args.grad_accum, lora_rank=args.lora)
  c, a = out["compiled"], out["analytic"]
  print(f"{args.preset} on {format_mesh(mesh)} ({mesh.size} x {mesh.devices.flat[0].device_kind}), "
        f"batch {args.batch} x {args.seq}, {args.grad_accum} microbatch(es), {cfg.dtype} compute, "
        f"{cfg.param_dtype} params, remat {cfg.remat}, capacity factor {cfg.capacity_factor or 'dropless'}; "
        f"compiled in {out['compile_seconds']:.1f} s")
  print(f"per device{'':22}{'compiled':>12}{'analytic':>12}")
  rows = [("parameters (GiB)", c["param_bytes"] / GiB, a["param_bytes"] / GiB),
          ("optimizer state (GiB)", c["opt_bytes"] / GiB, a["opt_bytes"] / GiB),
          ("temporaries (GiB)", c["temp_bytes"] / GiB, a["temp_bytes"] / GiB),
          ("TFLOPs per step", c["flops"] / 1e12, a["flops"] / 1e12),
          ("all-to-all GiB per step", c["all_to_all_bytes"] / GiB, a["all_to_all_bytes"] / GiB)]
  for name, got, want in rows:
    print(f"  {name:<30}{got:12.3f}{want:12.3f}")
  total = c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
  print(f"  peak estimate (arguments + outputs - donated + temporaries): {total / GiB:.2f} GiB")
  print("  (analytic temporaries: gradients and update plus a rough sum of saved residuals, one layer's attention scores "
        "and MoE buffers; all-to-all counts forward, remat and backward exchanges)")
  if jax.default_backend() == "cpu" and cfg.dtype == "bfloat16" and c["all_to_all_bytes"]:
    print("  note: XLA:CPU carries bfloat16 all-to-alls as float32, so the compiled bytes here are twice "
          "what TPU/GPU send")
  if c["unknown_trip_loops"]:
    print(f"  note: {c['unknown_trip_loops']} loop(s) with data-dependent trip counts were counted once")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"preset": args.preset, "mesh": format_mesh(mesh), "lora_rank": args.lora, **out}, f, indent=2)
  return 0
