"""``mixtral-jax tokenize``: tokenize text or chat files once into token shards that training reads.

  mixtral-jax tokenize ~/corpus/**/*.txt --out shards/corpus --workers 16
  mixtral-jax tokenize chats.jsonl --chat --out shards/chats
  mixtral-jax tokenize prefs.jsonl --preference --out shards/prefs     # DPO pairs

Rerunning the same command finishes an interrupted run (complete shards are kept).
"""

from __future__ import annotations

import argparse
import os

# Train on the shards with: mixtral-jax train --config continue-pretrain --workdir runs/cpt
#   --checkpoint ckpt/8x7b --set 'data.sources=[{path: shards/mix, weight: 1.0}]'
tokenize_example = "mixtral-jax tokenize ~/corpus/ web.jsonl books.parquet --out shards/mix --workers 8"


def tokenize_parser(p: argparse.ArgumentParser) -> None:
  p.add_argument("sources", nargs="+", metavar="SRC",
                 help="text files, directories, globs, JSONL, Parquet, or 'stdlib' (the Python standard library; "
                      "add --ext .py)")
  p.add_argument("--out", required=True, help="directory for the shards and manifest.json")
  p.add_argument("--tokenizer", default="v1", help="v1, v3 or a path to a tokenizer.model (default: v1)")
  p.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text (default: text)")
  p.add_argument("--chat", action="store_true",
                 help='chat data for SFT: JSONL lines {"messages": [...]}, loss on assistant turns')
  p.add_argument("--preference", action="store_true",
                 help='preference pairs for DPO: JSONL lines {"prompt" | "messages", "chosen", "rejected"}; held out '
                      "pair by pair")
  p.add_argument("--chat-version", default="v1", choices=("v1", "v3"),
                 help="mistral-common instruct template for --chat and --preference (default: v1)")
  p.add_argument("--ext", default=".txt,.md,.jsonl,.json,.parquet",
                 help="file suffixes read from directories, comma-separated (default: %(default)s)")
  p.add_argument("--heldout-fraction", type=float, default=0.02,
                 help="fraction of files held out for evaluation, chosen by a hash of each path (default: 0.02)")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="tokenizer processes (default: the CPU count)")
  p.add_argument("--shard-mb", type=float, default=32.0, help="input MB per shard, about (default: 32)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def tokenize_main(args) -> int:
  from mixtral_jax.tokenizer import Tokenizer  # noqa: PLC0415

  from .tokenize import TokenizeSpec, tokenize  # noqa: PLC0415

  if not 0 <= args.heldout_fraction < 1:
    raise ValueError(f"--heldout-fraction {args.heldout_fraction} must be in [0, 1)")
  if args.shard_mb <= 0:
    raise ValueError(f"--shard-mb {args.shard_mb} must be > 0")
  if args.chat and args.preference:
    raise ValueError("--chat and --preference both given; choose one (chat: SFT conversations, preference: DPO pairs)")
  tok = Tokenizer.load(args.tokenizer)
  kind = "chat" if args.chat else "preference" if args.preference else "text"
  spec = TokenizeSpec(tokenizer=tok.path, kind=kind, field=args.field,
                      chat_version=args.chat_version, heldout_fraction=args.heldout_fraction,
                      shard_mb=args.shard_mb)
  exts = tuple(e if e.startswith(".") else f".{e}" for e in args.ext.split(",") if e)
  m = tokenize(args.sources, args.out, spec, workers=args.workers, extensions=exts, progress=not args.no_progress)
  tr, held = m["splits"]["train"], m["splits"]["heldout"]
  print(f"{args.out}: train {tr['tokens']:,} tokens in {tr['documents']:,} {'pairs' if kind == 'preference' else 'documents'} ({len(tr['shards'])} shard(s)), "
        f"held-out {held['tokens']:,} tokens in {held['documents']:,} {'pairs' if kind == 'preference' else 'documents'}; {m['dtype']}, tokenizer "
        f"{m['tokenizer']['fingerprint']}")
  return 0
