"""``mixtral-jax eval harness|passkey|perplexity|routing`` (see ``mixtral_jax.cli`` for the dispatcher).

  mixtral-jax eval harness --model PATH --tasks mixtral_jax_demo [--include-path DIR] [--limit N] --out DIR
  mixtral-jax eval passkey --model PATH --lengths 1k,2k,4k --depths 0,0.25,0.5,0.75,1 --trials 5 --out DIR
  mixtral-jax eval perplexity --model PATH [--text FILE ...] --context-lengths 256,512,1k,2k --out DIR
  mixtral-jax eval routing --model PATH --out DIR [--domains python,prose,math,markup] [--domain NAME=PATH]

Every subcommand loads the model once (``--mesh`` shards it and the batches), shows progress bars, and
writes JSON (plus a table, a PNG or HTML pages) into ``--out``, which must not exist unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

EXAMPLES = {
    "harness": "mixtral-jax eval harness --model runs/tiny --tasks mixtral_jax_demo --limit 8 --out runs/eval-harness",
    "passkey": ("mixtral-jax eval passkey --model runs/passkey-tiny --lengths 128,256 --depths 0,0.5,1 --trials 8 "
                "--out runs/passkey-eval"),
    "perplexity": "mixtral-jax eval perplexity --model runs/tiny --context-lengths 128,256,512,1k --out runs/eval-ppl",
    "routing": "mixtral-jax eval routing --model runs/tiny --out runs/routing --tokens 4096",
}


def _common(p: argparse.ArgumentParser, required: bool = True) -> None:
  p.add_argument("--model", required=required, help="checkpoint (HF, consolidated, ours) or a training run's workdir")
  p.add_argument("--tokenizer", help="tokenizer.model path or v1/v3 (default: next to the model, else by vocab)")
  p.add_argument("--mesh", help="device mesh such as 'expert=4' or 'data=2,expert=4' (default: one device)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
  p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
  p.add_argument("--out", required=required, help="output folder (must not exist or be empty)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _sub(sub, name: str, help_: str) -> argparse.ArgumentParser:
  return sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {EXAMPLES[name]}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)


def eval_parser(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values())
  sub = p.add_subparsers(dest="what", metavar="SUBCOMMAND", required=True,
                         help="what to evaluate (each has its own --help, e.g. mixtral-jax eval passkey --help)")

  h = _sub(sub, "harness", "lm-evaluation-harness tasks through the mixtral-jax adapter (HarnessLM)")
  _common(h)
  h.add_argument("--tasks", required=True, help="comma-separated task, group or tag names (mixtral_jax_demo ships)")
  h.add_argument("--include-path", help="a folder of your own lm-eval task YAML files")
  h.add_argument("--limit", type=float, help="at most this many documents per task (or a fraction if < 1)")
  h.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
  h.add_argument("--max-length", type=int, help="longest window in tokens (default: max_position_embeddings)")
  h.add_argument("--log-samples", action="store_true", help="also write every request's responses")

  k = _sub(sub, "passkey", "passkey retrieval: a random 5-digit key hidden at a depth in filler text")
  _common(k, required=False)  # --write-data needs neither
  k.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens (512, 1k, 32k, ...)")
  k.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", help="key depths in [0, 1]")
  k.add_argument("--trials", type=int, default=5, help="random keys per (length, depth)")
  k.add_argument("--seed", type=int, default=0)
  k.add_argument("--allow-beyond", action="store_true", help="allow lengths beyond max_position_embeddings")
  k.add_argument("--write-data", metavar="DIR",
                 help="instead of evaluating, write passkey training documents (.txt) into DIR for a run config")
  k.add_argument("--count", type=int, default=3000, help="documents for --write-data")
  k.add_argument("--data-lengths", default="80,120", help="min,max tokens of --write-data prompts")
  k.add_argument("--data-row", type=int, help="pad --write-data documents to exactly this many tokens (the "
                 "run's data.seq_len, so that no training row cuts a question from its key)")
  k.add_argument("--data-pad", choices=("filler", "question"), default="filler",
                 help="what fills a --data-row document after its answer: filler sentences, or the question and "
                 "answer repeated while they fit (more retrieval signal per row), then filler")

  q = _sub(sub, "perplexity", "strided perplexity with bits per byte, and perplexity against context length")
  _common(q)
  q.add_argument("--text", action="append", default=[], help="a text file (repeatable; default: long stdlib files)")
  q.add_argument("--window", type=int, help="strided window in tokens (default: max_position_embeddings)")
  q.add_argument("--stride", type=int, help="strided step in tokens (default: window / 2)")
  q.add_argument("--context-lengths", help="window lengths for the context curve, e.g. 256,512,1k,2k (default: none)")
  q.add_argument("--target-tokens", type=int, default=128, help="last tokens of each text scored for the curve")
  q.add_argument("--allow-beyond", action="store_true", help="allow lengths beyond max_position_embeddings")

  r = _sub(sub, "routing", "the paper's routing analysis: expert shares by domain, repetition, coloured tokens")
  _common(r)
  r.add_argument("--domains", default="python,prose,math,markup", help="built-in domains (python,prose,math,markup)")
  r.add_argument("--domain", action="append", default=[], metavar="NAME=PATH", help="a domain of your own (repeatable)")
  r.add_argument("--tokens", type=int, default=8192, help="tokens per domain")
  r.add_argument("--seq-len", type=int, default=512, help="tokens per window")


def eval_main(args: argparse.Namespace) -> int:
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  return {"harness": _harness, "passkey": _passkey, "perplexity": _perplexity, "routing": _routing}[args.what](args)


def _load(args):
  from .loading import load_model  # noqa: PLC0415
  return load_model(args.model, tokenizer=args.tokenizer, mesh=args.mesh, dtype=args.dtype)


def _dump(obj, path: str) -> str:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  return path


def _check_lengths(lengths, cfg, allow_beyond: bool, flag: str) -> None:
  too_long = [n for n in lengths if n > cfg.max_position_embeddings]
  if too_long and not allow_beyond:
    raise ValueError(f"{flag} {too_long} exceed the model's max_position_embeddings={cfg.max_position_embeddings}; "
                     "drop them, or pass --allow-beyond to measure extrapolation")


# ------------------------------------------------------------------------------ subcommands


def _harness(args) -> int:
  from lm_eval.utils import make_table  # noqa: PLC0415

  from .harness import HarnessLM, run_tasks, task_manager  # noqa: PLC0415
  from .loading import prepare_out  # noqa: PLC0415

  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  task_manager(tasks, args.include_path)  # unknown names fail here, before the model loads
  out = prepare_out(args.out, args.overwrite)
  lm = HarnessLM(args.model, tokenizer=args.tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                 mesh=args.mesh, dtype=args.dtype, progress=not args.no_progress)
  res = run_tasks(lm, tasks, include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                  log_samples=args.log_samples)
  table = make_table(res)
  keep = {k: v for k, v in res.items() if k != "samples"}
  _dump(keep, os.path.join(out, "results.json"))
  if args.log_samples:
    _dump(res["samples"], os.path.join(out, "samples.json"))
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  print(table)
  print(f"results in {out}/results.json and results.md")
  return 0


def _passkey(args) -> int:
  from .loading import parse_floats, prepare_out  # noqa: PLC0415
  from .passkey import parse_length, run_passkey, write_training_text  # noqa: PLC0415

  if args.write_data:
    from mixtral_jax.tokenizer import Tokenizer  # noqa: PLC0415
    lo, hi = (parse_length(x) for x in args.data_lengths.split(","))
    out = prepare_out(args.write_data, args.overwrite)
    if args.data_row is not None and args.data_row < hi + 8:
      raise ValueError(f"--data-row {args.data_row} leaves no room after prompts of up to {hi} tokens; "
                       f"make it at least {hi + 8}")
    paths = write_training_text(Tokenizer.load(args.tokenizer or "v1"), out, args.count, lo, hi, args.seed,
                                row=args.data_row, pad=args.data_pad)
    print(f"wrote {len(paths)} passkey documents (prompts of {lo}-{hi} tokens) to {out}")
    return 0
  if not args.out or not args.model:
    raise ValueError("pass --model PATH and --out DIR (or --write-data DIR to write training text)")
  lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
  depths = parse_floats(args.depths, "--depths")
  bad = [d for d in depths if not 0 <= d <= 1]
  if bad or not depths:
    raise ValueError(f"--depths must be numbers in [0, 1], got {args.depths}")
  if args.trials < 1:
    raise ValueError(f"--trials must be >= 1, got {args.trials}")
  from mixtral_jax.checkpoint import load_config  # noqa: PLC0415
  if os.path.exists(args.model):
    _check_lengths(lengths, load_config(args.model), args.allow_beyond, "--lengths")
  out = prepare_out(args.out, args.overwrite)
  model, tokenizer, mesh = _load(args)
  _check_lengths(lengths, model.cfg, args.allow_beyond, "--lengths")
  if args.allow_beyond:  # generate() refuses prompts past the context; lift it for this model only
    model.cfg = model.cfg.replace(max_position_embeddings=max(max(lengths) + 16, model.cfg.max_position_embeddings))
  from .plots import passkey_heatmap  # noqa: PLC0415
  result = run_passkey(model, tokenizer, lengths, depths, args.trials, seed=args.seed, batch_size=args.batch_size,
                       mesh=mesh, progress=not args.no_progress)
  _dump(result, os.path.join(out, "passkey.json"))
  passkey_heatmap(result, os.path.join(out, "passkey.png"))
  print("length  " + " ".join(f"{d:>5g}" for d in depths))
  for L in lengths:
    print(f"{L:>6}  " + " ".join(f"{result['accuracy'][str(L)][f'{d:g}']:5.0%}" for d in depths))
  print(f"overall {result['overall']:.1%} (chance {result['chance']:.4%}); passkey.json and passkey.png in {out}")
  return 0


def _perplexity(args) -> int:
  from tqdm import tqdm  # noqa: PLC0415

  from .loading import prepare_out  # noqa: PLC0415
  from .passkey import parse_length  # noqa: PLC0415
  from .text_perplexity import against_context, default_texts, read_texts, strided  # noqa: PLC0415
  from .plots import context_perplexity  # noqa: PLC0415

  texts = read_texts(args.text) if args.text else default_texts()
  lengths = [parse_length(x) for x in args.context_lengths.split(",")] if args.context_lengths else []
  out = prepare_out(args.out, args.overwrite)
  model, tokenizer, mesh = _load(args)
  cfg = model.cfg
  _check_lengths(lengths, cfg, args.allow_beyond, "--context-lengths")
  window = args.window or cfg.max_position_embeddings
  _check_lengths([window], cfg, args.allow_beyond, "--window")
  bar = tqdm(desc="perplexity", unit="window", disable=args.no_progress, dynamic_ncols=True)
  result = {"strided": strided(model, tokenizer, texts, window=window, stride=args.stride or max(window // 2, 1),
                               batch_size=args.batch_size, mesh=mesh, bar=bar)}
  s = result["strided"]
  print(f"strided (window {s['window']}, stride {s['stride']}): perplexity {s['perplexity']:.3f}, "
        f"{s['bits_per_byte']:.4f} bits per byte over {s['tokens']} tokens")
  if lengths:
    c = against_context(model, tokenizer, texts, lengths, target_tokens=args.target_tokens,
                        batch_size=args.batch_size, mesh=mesh, bar=bar)
    result["context"] = c
    context_perplexity(c, os.path.join(out, "perplexity_context.png"))
    for L, nll in zip(c["context_lengths"], c["mean_nll"]):
      print(f"context {L:>6}: mean NLL {nll:.4f}, perplexity {np.exp(nll):.3f}")
    if c["skipped"]:
      print(f"left out (shorter than {c['context_lengths'][-1]} tokens): {', '.join(c['skipped'])}", file=sys.stderr)
  bar.close()
  _dump(result, os.path.join(out, "perplexity.json"))
  print(f"results in {out}")
  return 0


def _routing(args) -> int:
  from .domains import load_domains  # noqa: PLC0415
  from .loading import prepare_out  # noqa: PLC0415
  from .routing import analyse, write  # noqa: PLC0415

  extra = {}
  for spec in args.domain:
    if "=" not in spec:
      raise ValueError(f"--domain {spec!r}: write NAME=PATH")
    name, path = spec.split("=", 1)
    extra[name.strip()] = path.strip()
  names = [d.strip() for d in args.domains.split(",") if d.strip()]
  domains = load_domains(names, extra, max_chars=args.tokens * 8)
  out = prepare_out(args.out, args.overwrite)
  model, tokenizer, mesh = _load(args)
  result, pages = analyse(model, tokenizer, domains, seq_len=args.seq_len, tokens=args.tokens,
                          batch_size=args.batch_size, mesh=mesh, progress=not args.no_progress)
  write(result, pages, out)
  base = result["baselines"]
  L = result["layers"]
  print(f"consecutive tokens with the same first-choice expert (uniform {base['repeat_first']:.1%}) / sharing a "
        f"top-{result['top_k']} expert (uniform {base['repeat_topk']:.1%}):")
  for d, s in result["domains"].items():
    cells = ", ".join(f"L{layer} {s['repeat_first'][layer]:.1%}/{s['repeat_topk'][layer]:.1%}"
                      for layer in sorted({0, L // 2, L - 1}))
    print(f"  {d:<10} {cells}")
  print(f"routing.json, layer_XX.html and two plots in {out}")
  return 0

