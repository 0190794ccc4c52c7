"""``mixtral-jax serve``: load a model, build the continuous-batching engine, serve the OpenAI API.

  mixtral-jax serve --model PATH [--mesh expert=4] [--host 127.0.0.1 --port 8000] [--max-batch 16]
                    [--max-context N] [--quantize int8] [--kv-cache-gib N | --memory-utilization 0.9]
                    [--page-size 64] [--no-prefix-cache] [--adapter NAME=PATH ...] [--fixed-rows]

Then, from another shell::

  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'

The KV cache is paged (``mixtral_jax.inference.pages``): rows hold only the pages their tokens use,
common prompt prefixes are reused, decode runs only the rows in use. Its size is ``--kv-cache-gib``, else
the default of :func:`mixtral_jax.inference.memory.default_cache_bytes`, computed once the weights are
loaded: ``--memory-utilization`` (0.9) of each device's memory limit less what is in use (GPU, TPU), or
on CPU, which reports no free memory, what fixed rows would reserve (``--max-batch x --max-context``
tokens). ``--fixed-rows`` keeps the older cache of one ``--max-context`` row per ``--max-batch`` slot,
without adapters, logprobs or response_format.

``--adapter NAME=PATH`` (repeatable) serves LoRA adapters unmerged beside the base
(``mixtral_jax.lora.bank``): a request's ``model`` field picks ``NAME``, or the base by the served model
name, and one decode step mixes rows of different adapters. Each adapter is checked against the base
before anything compiles.

Start-up loads the model (``from_pretrained``, quantizing as it reads when asked), compiles the decode step and
the smallest prefill chunk, and only then listens, so ``GET /health`` answering means ready.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from mixtral_jax.inference.memory import DEFAULT_UTILIZATION
from mixtral_jax.inference.pages import PAGE_SIZE

serve_example = "mixtral-jax serve --model runs/tiny --port 8000 --max-batch 16 --quantize int8"


def serve_parser(p: argparse.ArgumentParser) -> None:
  from mixtral_jax.generation_commands import model_arguments  # noqa: PLC0415

  model_arguments(p, merged_adapter=False)
  p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=PATH",
                 help="serve a LoRA adapter unmerged under the model name NAME (repeatable; not with --fixed-rows): a "
                      "PEFT adapter directory or a mixtral-jax LoRA run, per-expert adapters included")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int, default=8000, help="port to listen on")
  p.add_argument("--max-batch", type=int, default=16, help="decode rows sharing the KV cache")
  p.add_argument("--max-context", type=int,
                 help="tokens per row, prompt plus reply (default: the model's max_position_embeddings)")
  p.add_argument("--max-queue", type=int, default=64,
                 help="requests that may wait for a row; more get 429")
  p.add_argument("--prefill-chunk", type=int, default=256,
                 help="prompt tokens per prefill step, padding included, while other requests decode; while no "
                      "more decode than prefill, up to --max-batch rows of this many tokens each (paged cache)")
  p.add_argument("--kv-cache-gib", type=float,
                 help="size of the paged KV cache per device: rows hold only the pages their tokens use, admission is "
                      "by free pages, common prompt prefixes are reused, and decode runs only the rows in use (default: "
                      "--memory-utilization of the device's memory after the weights on GPU/TPU; on CPU what fixed rows "
                      "would reserve, --max-batch x --max-context tokens)")
  p.add_argument("--memory-utilization", "--gpu-memory-utilization", type=float, dest="memory_utilization",
                 help=f"share of each device's memory limit that the weights and a KV cache sized from it may fill, the "
                      f"rest left for temporaries, as vLLM's --gpu-memory-utilization (default {DEFAULT_UTILIZATION}; "
                      "GPU/TPU only)")
  p.add_argument("--page-size", type=int, help=f"tokens per KV-cache page (default {PAGE_SIZE})")
  p.add_argument("--no-prefix-cache", action="store_true", help="do not reuse cached prompt prefixes")
  p.add_argument("--fixed-rows", action="store_true",
                 help="opt out of the paged cache: every --max-batch row reserves --max-context tokens and every decode "
                      "step computes every row (no --adapter, logprobs or response_format)")
  p.add_argument("--served-model-name", help="the model name clients send (default: the model directory's name)")
  p.add_argument("--chat-version", choices=("v1", "v3"),
                 help="instruct format: v1 (8x7B-Instruct) or v3 (8x22B-Instruct, tools) (default: v3 for a 32768 vocabulary, else v1)")


def check_serve_args(args: argparse.Namespace) -> None:
  """Every serve setting that can be wrong, checked before the model loads and compiles (minutes at full
  size): the sizes, and whether ``--host:--port`` can be listened on now (bound once with the options
  uvicorn uses, then released; a port taken between this check and the listen still fails there)."""
  if not 1 <= args.port <= 65535:
    raise ValueError(f"--port must be in [1, 65535], got {args.port}")
  for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                           ("--max-context", args.max_context, 2), ("--prefill-chunk", args.prefill_chunk, 1)):
    if value is not None and value < low:
      raise ValueError(f"{flag} must be >= {low}, got {value}")
  check_cache_args(args)
  if args.adapters and args.quantize:
    raise ValueError(f"--adapter is not served on a --quantize {args.quantize} base yet; serve the base unquantized")
  if args.adapters:
    from mixtral_jax.lora.bank import parse_adapter_flags  # noqa: PLC0415
    parse_adapter_flags(args.adapters, served_name(args))
  try:
    infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise ValueError(f"--host {args.host!r} cannot be resolved ({e.strerror}); pass an address such as "
                     "127.0.0.1 or 0.0.0.0") from None
  family, kind, proto, _, address = infos[0]
  with socket.socket(family, kind, proto) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
    try:
      probe.bind(address)
    except OSError as e:
      raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); stop what holds it, or pass "
                       "another --port") from None


def check_cache_args(args: argparse.Namespace) -> None:
  """The KV-cache flags: sizes in range, the paged cache's flags not mixed with ``--fixed-rows``, and
  ``--adapter`` not on an expert-parallel mesh (the expert kernels apply per-row adapters on one device
  or a mesh without an ``expert`` axis; refused here, before minutes of loading, not at the first trace)."""
  if args.kv_cache_gib is not None and not args.kv_cache_gib > 0:
    raise ValueError(f"--kv-cache-gib must be > 0, got {args.kv_cache_gib}")
  if args.memory_utilization is not None and not 0 < args.memory_utilization <= 1:
    raise ValueError(f"--memory-utilization must be in (0, 1], got {args.memory_utilization}")
  if args.page_size is not None and args.page_size < 1:
    raise ValueError(f"--page-size must be >= 1, got {args.page_size}")
  if args.kv_cache_gib is not None and args.memory_utilization is not None:
    raise ValueError("--kv-cache-gib sets the cache's size and --memory-utilization derives it: pass one of them")
  if args.fixed_rows:
    paged = [flag for flag, on in (("--adapter", args.adapters), ("--kv-cache-gib", args.kv_cache_gib is not None),
                                   ("--memory-utilization", args.memory_utilization is not None),
                                   ("--page-size", args.page_size is not None),
                                   ("--no-prefix-cache", args.no_prefix_cache)) if on]
    if paged:
      raise ValueError(f"{', '.join(paged)} need{'s' if len(paged) == 1 else ''} the paged KV cache, not with "
                       "--fixed-rows: drop --fixed-rows (the paged cache is the default)")
  if args.adapters and args.mesh and expert_axis(args.mesh) > 1:
    raise ValueError(f"--adapter is not served on a mesh with an expert axis yet (--mesh {args.mesh}): per-row "
                     "adapters run in the single-device expert kernels; serve on one device or a mesh without expert")


def expert_axis(mesh_spec: str) -> int:
  """The size of the ``expert`` axis of the mesh that ``--mesh`` builds (``make_mesh``, so ``expert=-1``
  and multi-slice specs count too)."""
  from mixtral_jax.sharding.mesh import make_mesh  # noqa: PLC0415 - imports jax

  return int(make_mesh(mesh_spec).shape["expert"])


def cache_gib(args: argparse.Namespace, model) -> tuple[float | None, str]:
  """The paged cache's GiB for the Engine (None: fixed rows) and, for the start-up line, how it was chosen:
  ``--kv-cache-gib``, else :func:`default_cache_bytes` on the devices holding ``model``'s weights."""
  if args.fixed_rows:
    return None, "fixed rows (--fixed-rows)"
  if args.kv_cache_gib is not None:
    return args.kv_cache_gib, f"--kv-cache-gib {args.kv_cache_gib:g}"
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from mixtral_jax.inference.memory import default_cache_bytes, device_memory  # noqa: PLC0415
  from mixtral_jax.inference.pages import bytes_per_token  # noqa: PLC0415 - as the engine counts it

  cfg = model.cfg
  max_context = args.max_context or cfg.max_position_embeddings
  placed = next((x.sharding.device_set for x in jax.tree.leaves(nnx.state(model)) if isinstance(x, jax.Array)),
                {jax.local_devices()[0]})
  devices = sorted((d for d in placed if d.process_index == jax.process_index()), key=lambda d: d.id)  # local ones
  memory = device_memory(devices)
  if memory is None and args.memory_utilization is not None:
    raise ValueError(f"--memory-utilization needs devices that report their memory (GPU, TPU); {devices[0].platform} "
                     "devices do not: pass --kv-cache-gib N, or neither for the fixed rows' memory")
  budget = default_cache_bytes(memory, utilization=args.memory_utilization or DEFAULT_UTILIZATION,
                               per_token=bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                         cfg.head_size, jax.numpy.dtype(cfg.dtype).itemsize),
                               max_batch=args.max_batch, max_context=max_context,
                               page_size=args.page_size or PAGE_SIZE)
  return budget.gib, f"{budget.gib:.3f} GiB by default: {budget.how}"


def served_name(args: argparse.Namespace) -> str:
  """The base model's name in requests: --served-model-name, else the model directory's name."""
  return args.served_model_name or os.path.basename(os.path.normpath(args.model))


def serve_main(args: argparse.Namespace) -> int:
  from mixtral_jax.generation_commands import load_model  # noqa: PLC0415 - keep `mixtral-jax --help` fast
  from mixtral_jax.inference.engine import Engine  # noqa: PLC0415
  from mixtral_jax.inference.server import build_app  # noqa: PLC0415

  check_serve_args(args)
  model, tokenizer = load_model(args)
  version = args.chat_version or ("v3" if model.cfg.vocab_size == 32768 else "v1")
  name = served_name(args)
  adapters: tuple[str, ...] = ()
  if args.adapters:  # checked against the base before anything compiles; kept unmerged, one bank
    from mixtral_jax.lora.bank import attach_bank, load_bank, parse_adapter_flags  # noqa: PLC0415
    bank = load_bank(parse_adapter_flags(args.adapters, name), model.cfg)
    model, adapters = attach_bank(model, bank), bank.names
  gib, how = cache_gib(args, model)
  engine = Engine(model, tokenizer, max_batch=args.max_batch, max_context=args.max_context,
                  max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, mesh=args.mesh,
                  kv_cache_gib=gib, page_size=args.page_size or PAGE_SIZE, prefix_caching=not args.no_prefix_cache,
                  adapters=adapters)
  engine.warmup()
  engine.start()
  app = build_app(engine, tokenizer, name, version)
  import uvicorn  # noqa: PLC0415
  cache = (f"{engine.B} rows x {engine.max_context} tokens, fixed rows" if engine.runner is None else
           f"{engine.B} rows, {(engine.runner.pool.num_pages - 1) * engine.runner.pool.page_size} paged cache tokens "
           f"({how})")
  if adapters:
    cache += f", adapters {', '.join(adapters)}"
  print(f"serving {name!r} ({version} chat, {cache}"
        f"{', ' + args.quantize if args.quantize else ''}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  finally:
    engine.stop()
  return 0
