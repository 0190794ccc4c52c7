"""``mixtral-jax generate`` and ``mixtral-jax chat`` (see ``mixtral_jax.cli`` for the dispatcher).

  mixtral-jax generate --model PATH --prompt "def fibonacci(n):" [--mesh expert=4] [--max-new-tokens 128]
  mixtral-jax chat --model PATH [--system "You are terse."] [--version v1|v3]

Both load the model with ``mixtral_jax.from_pretrained`` (a Hugging Face or Mistral consolidated
directory, our Orbax checkpoint, or a training run) and stream tokens to stdout as they are produced.
The tokenizer is ``--tokenizer``, else a ``tokenizer.model`` next to the checkpoint, else the bundled
Mistral tokenizer whose vocabulary matches the model (v1 for 32000 tokens, v3 for 32768).

Sampling defaults to temperature 0.7 and top-p 0.9 with a fixed seed (the same command prints the same
text): greedy decoding of a small or lightly trained model tends to lock into one repeated token, while
a sample reads like its training data. ``--temperature 0`` is greedy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

EXIT_COMMANDS = ("/exit", "/quit")


def model_arguments(p: argparse.ArgumentParser, merged_adapter: bool = True) -> None:
  """The options that say which model to load and how (shared by generate, chat and serve; serve has its
  own unmerged ``--adapter NAME=PATH``, so ``merged_adapter=False`` leaves the merged one out)."""
  p.add_argument("--model", required=True, help="checkpoint directory (HF, consolidated, ours, or a training run)")
  if merged_adapter:
    p.add_argument("--adapter", help="LoRA adapter merged into --model: a PEFT adapter directory or a mixtral-jax "
                   "LoRA training run")
  p.add_argument("--tokenizer", help="tokenizer.model path or bundled name v1/v3 (default: found or by vocab)")
  p.add_argument("--mesh", help="device mesh such as 'expert=4' or 'data=2,expert=4' (default: one device)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
  p.add_argument("--quantize", choices=("int8", "nf4"),
                 help="weight-only quantization done while loading (the full-precision model is never held whole): "
                      "int8 for every matmul weight, or nf4 (bitsandbytes' 4-bit NormalFloat) for attention and "
                      "experts; a bitsandbytes nf4 checkpoint loads as nf4 by itself")


def _common(p: argparse.ArgumentParser) -> None:
  model_arguments(p)
  p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per reply")
  p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
  p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens (default: all)")
  p.add_argument("--top-p", type=float, default=0.9,
                 help="sample only from the smallest set of tokens with this much probability; 1 turns it off")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same output)")
  p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
  p.add_argument("--prefill-chunk", type=int, default=None,
                 help="prompt tokens per prefill call, a power of two (default generate's, 2048); bounds prefill "
                      "memory (plan --generate)")


def load_model(args):
  import mixtral_jax  # noqa: PLC0415 - keep `mixtral-jax --help` fast
  from mixtral_jax.checkpoint import find_tokenizer  # noqa: PLC0415
  from mixtral_jax.tokenizer import BUNDLED_VOCAB, Tokenizer  # noqa: PLC0415

  # int8 is quantized as it is read (the full-precision model is never resident; see checkpoint.load)
  merged = getattr(args, "adapter", None)  # generate/chat's merged adapter (serve's are unmerged: args.adapters)
  model = mixtral_jax.from_pretrained(args.model, mesh=args.mesh, dtype=args.dtype, adapter=merged,
                                      quantize=args.quantize)
  vocab = model.cfg.vocab_size
  name = args.tokenizer or find_tokenizer(args.model) or BUNDLED_VOCAB.get(vocab)
  if name is None:
    raise ValueError(f"no tokenizer.model next to {args.model} and no bundled tokenizer has {vocab} tokens; "
                     "pass --tokenizer PATH")
  tokenizer = Tokenizer.load(name)
  tokenizer.check_vocab(vocab)
  return model, tokenizer


def check_sampling(args) -> None:
  """The sampling flags, checked before the model loads (one line each, not a load, a compile and then
  a traceback or, for a NaN temperature, garbage with exit code 0). The same rules as
  ``mixtral_jax.sampling.Sampling``, worded for the flags."""
  t, k, p, chunk = args.temperature, args.top_k, args.top_p, args.prefill_chunk
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if not (math.isfinite(t) and t >= 0):
    raise ValueError(f"--temperature must be a finite number >= 0 (0 is greedy), got {t}")
  if k is not None and k < 1:
    raise ValueError(f"--top-k must be >= 1 (leave it out to sample among all tokens), got {k}")
  if not (math.isfinite(p) and 0 < p <= 1):
    raise ValueError(f"--top-p must be in (0, 1] (1 turns it off), got {p}")
  if chunk is not None and (chunk < 1 or chunk & (chunk - 1)):
    raise ValueError(f"--prefill-chunk must be a power of two >= 1, got {chunk}")


def read_prompts(args) -> list[str]:
  """The --prompt texts, or stdin read as UTF-8; text that is not UTF-8 (bytes in an argument or on
  stdin, see ``mixtral_jax.text_input``) is one line naming the prompt and the byte."""
  from mixtral_jax.text_input import check_text  # noqa: PLC0415

  if args.prompt:
    prompts = list(args.prompt)
  else:
    stdin = sys.stdin
    raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
    try:
      prompts = [raw.decode("utf-8")]
    except UnicodeDecodeError as e:
      raise ValueError(f"the prompt on stdin is not valid UTF-8 text: byte 0x{raw[e.start]:02x} at byte "
                       f"{e.start}; pass the text as UTF-8") from None
  for i, prompt in enumerate(prompts):
    check_text(prompt, f"prompt {i}" if len(prompts) > 1 else "the prompt")
  return prompts


def _sampling(args) -> dict:
  return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, stop=args.stop, mesh=args.mesh,
              # unset: generate's own default (mixtral_jax.generate.PREFILL_CHUNK), one value for API and CLI
              **({} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}))


def _print_stream(_row: int, _token, text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


class _EchoThenStream:
  """A stream callback that writes ``echo`` before the first token's text (``finish`` writes it if no
  token came)."""

  def __init__(self, echo: str):
    self.pending = echo

  def __call__(self, row: int, token, text: str) -> None:
    self.finish()
    _print_stream(row, token, text)

  def finish(self) -> None:
    if self.pending:
      sys.stdout.write(self.pending)
      self.pending = ""


# ------------------------------------------------------------------------------------ generate


generate_example = 'mixtral-jax generate --model runs/tiny --prompt "def fibonacci(n):" --max-new-tokens 64'


def generate_parser(p: argparse.ArgumentParser) -> None:
  p.add_argument("--prompt", action="append",
                 help="prompt text (repeatable: several prompts run as one batch); default: read stdin")
  p.add_argument("--no-echo", dest="echo", action="store_false",
                 help="print only the continuation, not the prompt before it")
  _common(p)


def generate_main(args: argparse.Namespace) -> int:
  """One prompt streams its continuation; several run as one batch and print in order when done."""
  from mixtral_jax.generate import generate  # noqa: PLC0415

  check_sampling(args)
  prompts = read_prompts(args)
  model, tokenizer = load_model(args)
  if len(prompts) == 1:
    # The prompt is echoed with the first token, so a prompt that generate() refuses (too long for the
    # context, say) is never printed whole before the error.
    stream = _EchoThenStream(prompts[0] if args.echo else "")
    out = generate(model, prompts, tokenizer=tokenizer, stream=stream, **_sampling(args))
    stream.finish()
    print()
  else:
    out = generate(model, prompts, tokenizer=tokenizer, **_sampling(args))
    for i, (prompt, text) in enumerate(zip(prompts, out.texts)):
      print(f"=== {i}\n{prompt if args.echo else ''}{text}")
  for i, reason in enumerate(out.finish_reasons):
    print(f"[{i}: {len(out.tokens[i])} tokens, finished by {reason}]", file=sys.stderr)
  return 0


# ------------------------------------------------------------------------------------ chat


chat_example = 'mixtral-jax chat --model ckpt/8x7b-instruct --system "You are terse." --mesh expert=8'

CHAT_EPILOG = """An empty line, /exit or /quit (or end of input, Ctrl-D) ends the session.

example:
  """ + chat_example


def chat_parser(p: argparse.ArgumentParser) -> None:
  p.description = ("an interactive chat session with an Instruct model: type a message, read the streamed reply; "
                   "warns when the model does not look like an Instruct model")
  p.epilog = CHAT_EPILOG
  p.add_argument("--system", help="system prompt")
  p.add_argument("--version", choices=("v1", "v3"),
                 help="instruct format: v1 (Mixtral-8x7B-Instruct) or v3 (8x22B-Instruct); default by vocabulary")
  _common(p)


def chat_main(args: argparse.Namespace) -> int:
  """Reads a user turn per line of stdin, encodes the whole conversation with mistral-common's template
  (``mixtral_jax.chat.encode_chat``) and streams the reply. An empty line, /exit or /quit ends the session."""
  from mixtral_jax.chat import encode_chat  # noqa: PLC0415
  from mixtral_jax.generate import generate  # noqa: PLC0415

  check_sampling(args)
  model, tokenizer = load_model(args)
  version = args.version or ("v3" if model.cfg.vocab_size == 32768 else "v1")
  messages = [{"role": "system", "content": args.system}] if args.system else []
  if instruct_evidence(args.model) is None:
    print(f"warning: {args.model} does not look like an Instruct model (nothing in its name, its config or its "
          "training run says Instruct or chat fine-tuning); a base model does not follow the chat template and "
          "tends to continue text instead of answering", file=sys.stderr)
  interactive = sys.stdin.isatty()
  if interactive:
    print(f"chat with {args.model} ({version} template). An empty line, /exit or /quit ends the session.",
          file=sys.stderr)
  while True:
    if interactive:
      print("> ", end="", flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() in ("", *EXIT_COMMANDS):
      return 0
    messages.append({"role": "user", "content": line.rstrip("\n")})
    ids = encode_chat(messages, version=version)
    out = generate(model, [ids], tokenizer=tokenizer, stream=_print_stream, **_sampling(args))
    print(flush=True)
    messages.append({"role": "assistant", "content": out.texts[0]})


def instruct_evidence(path: str) -> str | None:
  """Why the checkpoint at ``path`` looks like an Instruct (chat-tuned) model, or None.

  A heuristic, because the weights cannot tell: the directory's name (or, for one step of a training
  run, the run's) names an Instruct model, as released and converted checkpoints do
  (``Mixtral-8x7B-Instruct-v0.1``, ``ckpt/8x7b-instruct``); a ``config.json`` records an ``_name_or_path``
  that does; or the training run's ``train_config.yaml`` fine-tuned on chat data (``data.format: chat``)
  or started from such a checkpoint. A renamed Instruct checkpoint is missed (a needless warning); a base
  model in a directory named "instruct" passes unwarned.
  """
  import yaml  # noqa: PLC0415 - keep `mixtral-jax --help` fast

  path = os.path.abspath(path)
  dirs = [path]
  if os.path.basename(os.path.dirname(path)) == "checkpoints":  # one step of a training run: the run too
    dirs.append(os.path.dirname(os.path.dirname(path)))
  if any("instruct" in os.path.basename(d).lower() for d in dirs):
    return "its name says Instruct"
  for d in dirs:
    try:
      with open(os.path.join(d, "config.json")) as f:
        name = str(json.load(f).get("_name_or_path", ""))
      if "instruct" in name.lower():
        return f"its config.json names {name}"
    except (OSError, ValueError, AttributeError):
      pass
    try:
      with open(os.path.join(d, "train_config.yaml")) as f:
        run = yaml.safe_load(f) or {}
      if (run.get("data") or {}).get("format") == "chat":
        return "its training run fine-tuned on chat data"
      if "instruct" in str((run.get("model") or {}).get("checkpoint") or "").lower():
        return "its training run started from an Instruct checkpoint"
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
      pass
  return None
