"""``mixtral-jax serve``: load a model, build the continuous-batching engine, serve the OpenAI API.

  mixtral-jax serve --model PATH [--mesh expert=4] [--host 127.0.0.1 --port 8000] [--max-batch 16]
                    [--max-context N] [--quantize int8] [--kv-cache-gib N [--page-size 64] [--no-prefix-cache]]
                    [--adapter NAME=PATH ...]

Then, from another shell::

  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'

``--adapter NAME=PATH`` (repeatable, with ``--kv-cache-gib``) serves LoRA adapters unmerged beside the base
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

serve_example = "mixtral-jax serve --model runs/tiny --port 8000 --max-batch 16 --quantize int8"


def serve_parser(p: argparse.ArgumentParser) -> None:
  from mixtral_jax.generation_commands import model_arguments  # noqa: PLC0415

  model_arguments(p, merged_adapter=False)
  p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=PATH",
                 help="serve a LoRA adapter unmerged under the model name NAME (repeatable; needs --kv-cache-gib): a "
                      "PEFT adapter directory or a mixtral-jax LoRA run, per-expert adapters included")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int, default=8000, help="port to listen on")
  p.add_argument("--max-batch", type=int, default=16, help="decode rows sharing the KV cache")
  p.add_argument("--max-context", type=int,
                 help="tokens per row, prompt plus reply (default: the model's max_position_embeddings)")
  p.add_argument("--max-queue", type=int, default=64,
                 help="requests that may wait for a row; more get 429")
  p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
  p.add_argument("--kv-cache-gib", type=float,
                 help="a paged KV cache of this many GiB: rows hold only the pages their tokens use, admission "
                      "is by free pages, common prompt prefixes are reused, and decode runs only the rows in use (one "
                      "client on a 16-row server: 25-50 tok/s paged against 2 with fixed rows on bench-small, CPU); "
                      "recommended (default: fixed rows of --max-context)")
  p.add_argument("--page-size", type=int, default=64, help="tokens per KV-cache page (with --kv-cache-gib)")
  p.add_argument("--no-prefix-cache", action="store_true", help="do not reuse cached prompt prefixes (with --kv-cache-gib)")
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
  if args.adapters and args.kv_cache_gib is None:
    raise ValueError("--adapter needs the paged KV cache: add --kv-cache-gib N (e.g. --kv-cache-gib 4)")
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
  engine = Engine(model, tokenizer, max_batch=args.max_batch, max_context=args.max_context,
                  max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, mesh=args.mesh,
                  kv_cache_gib=args.kv_cache_gib, page_size=args.page_size, prefix_caching=not args.no_prefix_cache,
                  adapters=adapters)
  engine.warmup()
  engine.start()
  app = build_app(engine, tokenizer, name, version)
  import uvicorn  # noqa: PLC0415
  cache = (f"{engine.B} rows x {engine.max_context} tokens" if engine.runner is None else
           f"{engine.B} rows, {(engine.runner.pool.num_pages - 1) * engine.runner.pool.page_size} paged cache tokens")
  if adapters:
    cache += f", adapters {', '.join(adapters)}"
  print(f"serving {name!r} ({version} chat, {cache}"
        f"{', ' + args.quantize if args.quantize else ''}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  finally:
    engine.stop()
  return 0
