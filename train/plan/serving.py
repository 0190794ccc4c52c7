"""``mixtral-jax plan --generate``: will serving fit? Compile prefill and decode ahead of time, from shapes.

  mixtral-jax plan --generate --preset mixtral-8x7b --mesh tensor=2 --batch 8 --context 32768 --device h200

The programs are generation's own (``mixtral_jax.inference.programs``, which ``generate`` and ``serve``
run): the batch prefill, one prefill chunk of
C = min(``--context``, ``--prefill-chunk``) columns of every row into a KV cache of ``--context`` slots
(the largest program of a prefill; ``generate`` runs it context / C times, the last chunk sampling the
first token), and the decode chunk (one token per row against that cache), lowered from
``ShapeDtypeStruct``s on the mesh and compiled for its devices. Both carry the stacked cache through
the layer scan and write it in place (donated), so neither holds a second cache. (``serve`` prefills a
request alone on its own row, or all rows at once, in chunks of its own ``--prefill-chunk``: the same
program or a smaller one.) Per device it prints the parameters, the KV cache, and each program's
temporaries and peak (arguments + outputs - donated + temporaries).

Weights: a weight format is a function (config, mesh) -> (graphdef, abstract parameter state) in
:data:`WEIGHT_FORMATS`; ``bf16`` is the model's own parameters in bfloat16, sharded by the
logical-axis table; ``int8`` (``--quantize int8``) is :func:`mixtral_jax.inference.quantize.quantize`'s
layout. Serving is dropless (no capacity factor): generation must not drop tokens.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mixtral_jax.config import MixtralConfig
from mixtral_jax.model import KVCache
from mixtral_jax.attention import LayerCache
from mixtral_jax.params import abstract_model, param_shardings
from mixtral_jax.sharding.mesh import format_mesh, make_mesh

from . import topology
from .compiling import GiB, compile_or_verdict, fit_lines, header, kernel_lines, model_config, shard_bytes, target_devices

BATCH_AXES = ("data", "fsdp", "expert")


def _abstract(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def bf16_weights(cfg: MixtralConfig, mesh):
  """The model's parameters in bfloat16, each sharded by its logical axes."""
  graphdef, state = nnx.split(abstract_model(cfg.replace(param_dtype="bfloat16")))
  return graphdef, _abstract(state, param_shardings(state, mesh))


def int8_weights(cfg: MixtralConfig, mesh):
  """int8 weight-only (``mixtral_jax.inference.quantize``): every matmul weight int8 with float32
  per-output-channel scales, the router, norms and embedding bfloat16; each sharded by its logical axes."""
  graphdef, state = nnx.split(abstract_model(cfg.replace(param_dtype="bfloat16"), quantize="int8"))
  return graphdef, _abstract(state, param_shardings(state, mesh))


WEIGHT_FORMATS = {"bf16": bf16_weights, "int8": int8_weights}


def cache_sharding(mesh, batch: int, kv_heads: int) -> tuple[P, P]:
  """(spec of k/v [L, B, S, K, H], spec of pos [B, S]): rows over the batch axes that divide the
  batch (in order), kv heads over ``tensor`` when it divides them."""
  rows, left = [], batch
  for a in BATCH_AXES:
    n = mesh.shape.get(a, 1)
    if n > 1 and left % n == 0:
      rows.append(a)
      left //= n
  rows_spec = tuple(rows) if len(rows) > 1 else (rows[0] if rows else None)
  tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 and kv_heads % mesh.shape["tensor"] == 0 else None
  return P(None, rows_spec, None, tensor, None), P(rows_spec, None)


def abstract_cache(cfg: MixtralConfig, mesh, batch: int, context: int) -> KVCache:
  S = context if cfg.sliding_window is None else min(context, cfg.sliding_window)
  kv_spec, pos_spec = cache_sharding(mesh, batch, cfg.num_key_value_heads)
  shape = (cfg.num_hidden_layers, batch, S, cfg.num_key_value_heads, cfg.head_size)
  kv = jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype), sharding=NamedSharding(mesh, kv_spec))
  return KVCache(LayerCache(kv, kv), jax.ShapeDtypeStruct((batch, S), jnp.int32,
                                                         sharding=NamedSharding(mesh, pos_spec)))


def plan_serving(cfg: MixtralConfig, mesh, *, batch: int, context: int, weights: str = "bf16",
                 prefill_chunk: int | None = None) -> dict:
  """Compiles one prefill chunk (``batch`` x min(``context``, ``prefill_chunk``) prompt tokens into a
  ``context``-slot cache) and one decode chunk; figures per device."""
  from mixtral_jax.generate import PREFILL_CHUNK, bucket, prefill_chunk_size  # noqa: PLC0415
  from mixtral_jax.inference.programs import lower_decode, lower_prefill  # noqa: PLC0415

  chunk = prefill_chunk_size(bucket(context, 16), prefill_chunk or PREFILL_CHUNK)

  if weights not in WEIGHT_FORMATS:
    raise ValueError(f"weight format {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
  cfg = cfg.replace(param_dtype="bfloat16", dtype="bfloat16", remat="none", capacity_factor=None)
  graphdef, state = WEIGHT_FORMATS[weights](cfg, mesh)
  cache = abstract_cache(cfg, mesh, batch, context)
  kv_spec, pos_spec = cache_sharding(mesh, batch, cfg.num_key_value_heads)
  rows = NamedSharding(mesh, pos_spec)
  ids = jax.ShapeDtypeStruct((batch, chunk), jnp.int32, sharding=rows)
  args_bytes = shard_bytes(state) + shard_bytes(cache)

  out = {"param_bytes": shard_bytes(state), "kv_cache_bytes": shard_bytes(cache), "weights": weights,
         "prefill_chunk": chunk}
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = lower_prefill(graphdef, state, cache, chunk, rows)
    _, out["prefill"] = compile_or_verdict(lowered, args_bytes + 3 * shard_bytes(ids))
    lowered = lower_decode(graphdef, state, cache, rows)
    _, out["decode"] = compile_or_verdict(lowered, args_bytes)
  out["compile_seconds"] = time.perf_counter() - t0
  out["peak_bytes"] = max(out["prefill"]["peak_bytes"], out["decode"]["peak_bytes"])
  return out


def paged_cache_line(out: dict, device: tuple[str, float], cache_tokens: int) -> str:
  """How many tokens of paged KV cache (serve --kv-cache-gib) fit per device: the device's memory less
  the parameters and the larger program's temporaries, at the per-token cost of the compiled cache."""
  from mixtral_jax.inference.pages import PAGE_SIZE  # noqa: PLC0415

  name, gib = device
  per_token = out["kv_cache_bytes"] / cache_tokens
  temps = max(out[p].get("temp_bytes", 0) for p in ("prefill", "decode"))
  free = gib * GiB - out["param_bytes"] - temps
  tokens = max(int(free // (per_token * PAGE_SIZE)) - 1, 0) * PAGE_SIZE
  return (f"paged KV cache (serve --kv-cache-gib {max(free, 0) / GiB:.1f}): {tokens:,} tokens fit on {name} "
          f"({per_token / 1024:.0f} KiB per token per device, after {out['param_bytes'] / GiB:.2f} GiB of parameters "
          f"and {temps / GiB:.2f} GiB of temporaries); {serve_default(out, device, per_token)}")


def serve_default(out: dict, device: tuple[str, float], per_token: float) -> str:
  """What ``serve`` without --kv-cache-gib would take on this device, the parameters being what is in use
  (:func:`mixtral_jax.inference.memory.default_cache_bytes`, max_context 1 so that only the memory decides)."""
  from mixtral_jax.inference.memory import DEFAULT_UTILIZATION, DeviceMemory, default_cache_bytes  # noqa: PLC0415
  from mixtral_jax.inference.pages import PAGE_SIZE  # noqa: PLC0415

  name, gib = device
  try:
    budget = default_cache_bytes([DeviceMemory(name, int(gib * GiB), out["param_bytes"])],
                                 utilization=DEFAULT_UTILIZATION, per_token=int(per_token), max_batch=1, max_context=1,
                                 page_size=PAGE_SIZE)
  except ValueError:
    return f"serve's default ({DEFAULT_UTILIZATION:g} of the memory less the parameters) leaves no room for the cache"
  tokens = (budget.bytes // (int(per_token) * PAGE_SIZE) - 1) * PAGE_SIZE
  return (f"serve's default ({DEFAULT_UTILIZATION:g} x {gib:g} GiB - the parameters, --memory-utilization) takes "
          f"{budget.gib:.1f} GiB, {tokens:,} tokens (on GPU JAX's limit is XLA_PYTHON_CLIENT_MEM_FRACTION of the card)")


def serve_main(args, count: int) -> int:
  import json  # noqa: PLC0415

  context = args.context or args.seq
  cfg = model_config(args)
  devices = target_devices(args, count)
  mesh = make_mesh(args.mesh, devices=devices, num_experts=cfg.num_local_experts)
  out = plan_serving(cfg, mesh, batch=args.batch, context=context, weights=getattr(args, "quantize", None) or "bf16",
                     prefill_chunk=getattr(args, "prefill_chunk", None))
  cfg = cfg.replace(param_dtype="bfloat16", capacity_factor=None)
  print(header(args, cfg, mesh, f"serving batch {args.batch}, context {context}, {out['weights']} weights")
        + f"; compiled in {out['compile_seconds']:.1f} s")
  print(f"per device: parameters {out['param_bytes'] / GiB:.2f} GiB, KV cache {out['kv_cache_bytes'] / GiB:.2f} GiB")
  print(f"  prefill: generate's chunk program, {args.batch} rows x {out['prefill_chunk']} prompt columns per call "
        f"({-(-context // out['prefill_chunk'])} calls for a {context}-token prompt; --prefill-chunk)")
  for name in ("prefill", "decode"):
    f = out[name]
    if f.get("oom"):
      print(f"  {name}: does not fit: the TPU compiler needs {f['temp_bytes'] / GiB:.2f} GiB of temporaries "
            f"of {f['available_bytes'] / GiB:.2f} GiB ({f['message']})")
    else:
      print(f"  {name:<8} temporaries {f['temp_bytes'] / GiB:8.2f} GiB   peak {f['peak_bytes'] / GiB:8.2f} GiB   "
            f"{f['flops'] / 1e12:9.3f} TFLOPs")
      for line in kernel_lines(f):
        print("  " + line)
  device = topology.device_memory(args.device, list(mesh.devices.flat))
  tips = topology.advice(0, 1, mesh_sizes=dict(mesh.shape), remat="none", grad_accum=1, batch=args.batch,
                         serving=True)
  lines, verdict = fit_lines(out["peak_bytes"], device, tips)
  for line in lines:
    print(line)
  if device is not None:  # what serve --kv-cache-gib could hold in the rest of the card
    print(paged_cache_line(out, device, args.batch * context))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"preset": args.preset, "mesh": format_mesh(mesh), "topology": args.topology, "batch": args.batch,
                 "context": context, "device": verdict, "serving": out,
                 "compiled": {"peak_bytes": out["peak_bytes"]}}, fh, indent=2)
  return 0
