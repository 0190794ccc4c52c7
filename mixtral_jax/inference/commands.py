"""``mixtral-jax serve``: load a model, build the continuous-batching engine, serve the OpenAI API.

  mixtral-jax serve --model PATH [--mesh expert=4] [--host 127.0.0.1 --port 8000] [--max-batch 16]
                    [--max-context N] [--quantize int8]

Then, from another shell::

  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'

Start-up loads the model (``from_pretrained``, quantizing as it reads when asked), compiles the decode step and
the smallest prefill chunk, and only then listens, so ``GET /health`` answering means ready.
"""

from __future__ import annotations

import argparse
import os
import sys

serve_example = "mixtral-jax serve --model runs/tiny --port 8000 --max-batch 16 --quantize int8"


def serve_parser(p: argparse.ArgumentParser) -> None:
  from mixtral_jax.generation_commands import model_arguments  # noqa: PLC0415

  model_arguments(p)
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int, default=8000, help="port to listen on")
  p.add_argument("--max-batch", type=int, default=16, help="decode rows sharing the KV cache")
  p.add_argument("--max-context", type=int,
                 help="tokens per row, prompt plus reply (default: the model's max_position_embeddings)")
  p.add_argument("--max-queue", type=int, default=64,
                 help="requests that may wait for a row; more get 429")
  p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
  p.add_argument("--served-model-name", help="the model name clients send (default: the model directory's name)")
  p.add_argument("--chat-version", choices=("v1", "v3"),
                 help="instruct format: v1 (8x7B-Instruct) or v3 (8x22B-Instruct, tools) (default: v3 for a 32768 vocabulary, else v1)")


def serve_main(args: argparse.Namespace) -> int:
  from mixtral_jax.generation_commands import load_model  # noqa: PLC0415 - keep `mixtral-jax --help` fast
  from mixtral_jax.inference.engine import Engine  # noqa: PLC0415
  from mixtral_jax.inference.server import build_app  # noqa: PLC0415

  if not 1 <= args.port <= 65535:
    raise ValueError(f"--port must be in [1, 65535], got {args.port}")
  model, tokenizer = load_model(args)
  version = args.chat_version or ("v3" if model.cfg.vocab_size == 32768 else "v1")
  name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
  engine = Engine(model, tokenizer, max_batch=args.max_batch, max_context=args.max_context,
                  max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, mesh=args.mesh)
  engine.warmup()
  engine.start()
  app = build_app(engine, tokenizer, name, version)
  import uvicorn  # noqa: PLC0415
  print(f"serving {name!r} ({version} chat, {engine.B} rows x {engine.max_context} tokens"
        f"{', ' + args.quantize if args.quantize else ''}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  finally:
    engine.stop()
  return 0
