"""``mixtral-jax serve``: load a model, build the continuous-batching engine, serve the OpenAI API.

  mixtral-jax serve --model PATH [--mesh expert=4] [--host 127.0.0.1 --port 8000] [--max-batch 16]
                    [--max-context N] [--quantize int8]

Start-up loads the model (``from_pretrained``), quantizes it when asked, compiles the decode step and
the smallest prefill chunk, and only then listens, so ``GET /health`` answering means ready.
"""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples (then: curl localhost:8000/v1/models, or any OpenAI client at http://127.0.0.1:8000/v1):
  mixtral-jax serve --model runs/tiny --port 8000 --max-batch 16 --quantize int8"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """Defaults in the option help, the example epilog as written."""


def serve_parser(p: argparse.ArgumentParser) -> None:
  p.epilog = EPILOG
  p.formatter_class = _Formatter
  p.add_argument("--model", required=True, help="checkpoint directory (HF, consolidated, ours, or a training run)")
  p.add_argument("--adapter", help="LoRA adapter merged into --model: a PEFT adapter directory or a mixtral-jax "
                 "LoRA training run")
  p.add_argument("--tokenizer", help="tokenizer.model path or bundled name v1/v3")
  p.add_argument("--mesh", help="device mesh such as 'expert=4'; None: one device")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--quantize", choices=("int8",), help="int8 weight-only quantization of every matmul weight")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int, default=8000, help="port to listen on")
  p.add_argument("--max-batch", type=int, default=16, help="decode rows sharing the KV cache")
  p.add_argument("--max-context", type=int,
                 help="tokens per row, prompt plus reply; None: the model's max_position_embeddings")
  p.add_argument("--max-queue", type=int, default=64,
                 help="requests that may wait for a row; more get 429")
  p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
  p.add_argument("--served-model-name", help="the model name clients send; None: the model directory's name")
  p.add_argument("--chat-version", choices=("v1", "v3"),
                 help="instruct format: v1 (8x7B-Instruct) or v3 (8x22B-Instruct, tools); None: v3 for a 32768 vocabulary")


def serve_main(args: argparse.Namespace) -> int:
  from mixtral_jax.generation_commands import _load  # noqa: PLC0415 - keep `mixtral-jax --help` fast
  from mixtral_jax.inference.engine import Engine  # noqa: PLC0415
  from mixtral_jax.inference.server import build_app  # noqa: PLC0415

  if not 1 <= args.port <= 65535:
    raise ValueError(f"--port must be in [1, 65535], got {args.port}")
  model, tokenizer = _load(args)
  version = args.chat_version or ("v3" if model.cfg.vocab_size == 32768 else "v1")
  name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
  engine = Engine(model, tokenizer, max_batch=args.max_batch, max_context=args.max_context,
                  max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, mesh=args.mesh)
  engine.warmup()
  engine.start()
  app = build_app(engine, tokenizer, name, version)
  import uvicorn  # noqa: PLC0415
  print(f"serving {name!r} ({version} chat, {engine.B} rows x {engine.max_context} tokens"
        f"{', int8' if args.quantize else ''}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  finally:
    engine.stop()
  return 0
