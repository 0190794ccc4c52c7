"""The ``mixtral-jax`` command: a thin dispatcher over subcommands that live next to what they run.

Each subcommand module defines ``NAME_parser(parser)`` to add its arguments, ``NAME_main(args)`` to run
it (returning an exit code) and ``NAME_example``, one example command line that ends its ``--help``
(or the parser sets its own epilog). Modules are imported only for the subcommand asked for, so
``mixtral-jax --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import glob
import importlib
import importlib.util
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mixtral_jax.checkpoint.commands",
             "build the tiny preset, save it, load it back through from_pretrained, print logits and counts"),
    "convert": ("mixtral_jax.checkpoint.commands",
                "convert a Hugging Face or Mistral consolidated checkpoint (SRC) to an Orbax checkpoint (DST)"),
    "export": ("mixtral_jax.checkpoint.commands",
               "export an Orbax checkpoint (ours or a training run's) to Hugging Face safetensors"),
    "tokenize": ("mixtral_jax.train.data.commands",
                 "tokenize text, JSONL, Parquet or chat files once into token shards (+ manifest) for training"),
    "train": ("mixtral_jax.train.commands", "pretrain, continue-train or fine-tune from a YAML run config"),
    "plan": ("mixtral_jax.train.plan",
             "will it fit? compile a preset's train step (or prefill/decode) ahead of time for a mesh, a TPU "
             "slice or simulated GPUs: memory, peak, FLOPs, all-to-all bytes"),
    "generate": ("mixtral_jax.generation_commands", "generate text from a model, optionally sharded on a mesh"),
    "chat": ("mixtral_jax.generation_commands", "an interactive chat session with an instruct model"),
    "serve": ("mixtral_jax.inference.commands",
              "an OpenAI-compatible HTTP server with continuous batching (chat, completions, streaming, tools)"),
    "eval": ("mixtral_jax.eval.commands",
             "evaluate a model: lm-eval harness tasks, passkey retrieval, perplexity, routing analysis"),
}

EPILOG = """examples:
  mixtral-jax train --config tiny-pretrain --workdir runs/tiny
  mixtral-jax tokenize ~/corpus/ --out shards/corpus --workers 8
  mixtral-jax generate --model runs/tiny --prompt "def fibonacci(n):"
  mixtral-jax convert ~/Mixtral-8x7B-v0.1 ckpt/8x7b
  mixtral-jax serve --model runs/tiny --port 8000 --max-batch 16
  mixtral-jax plan --preset mixtral-8x7b --mesh data=2,fsdp=4,expert=8 --batch 256 --seq 4096
  mixtral-jax eval harness --model runs/tiny --tasks mixtral_jax_demo --limit 8 --out runs/eval

Run 'mixtral-jax COMMAND --help' for a command's options."""


# Storage errors that are the user's to fix (permissions, a read-only mount, a full disk or quota): one
# line naming the path and the fix instead of a traceback.
DISK_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
               errno.EDQUOT: "disk quota exceeded"}


def disk_error_line(e: OSError) -> str:
  """``cannot write PATH: no space left on device; ...`` for an OSError whose errno is in DISK_ERRNOS."""
  where = e.filename or "the destination"
  fix = ("free some space or choose a destination on another disk" if e.errno in (errno.ENOSPC, errno.EDQUOT)
         else "choose a writable destination or fix its permissions")
  return f"cannot write {where}: {DISK_ERRNOS[e.errno]}; {fix}"


class HelpFormatter(argparse.HelpFormatter):
  """Subcommand help: appends one ``(default: X)`` to an option's help unless the text already states its
  default or there is nothing to say (a flag, no default, a required option), so no option reads
  ``(default: ...) (default: None)``; keeps multi-line descriptions and epilogs (examples) as written."""

  def _get_help_string(self, action):
    help_ = action.help or ""
    quiet = (action.nargs == 0 or action.default is None or action.default == [] or action.required
             or not action.option_strings or "default" in help_)
    return help_ if quiet else f"{help_} (default: %(default)s)"

  def _fill_text(self, text, width, indent):
    if "\n" in text:
      return "".join(indent + line for line in text.splitlines(keepends=True))
    return super()._fill_text(text, width, indent)


def command_parser(name: str):
  """(the subcommand's module, its full argument parser)."""
  module_name, help_ = COMMANDS[name]
  module = importlib.import_module(module_name)
  parser = argparse.ArgumentParser(prog=f"mixtral-jax {name}", description=help_, formatter_class=HelpFormatter)
  getattr(module, f"{name}_parser")(parser)
  example = getattr(module, f"{name}_example", None)
  if example and not parser.epilog:
    parser.epilog = "example:\n  " + example.strip().replace("\n", "\n  ")
  return module, parser


def _top_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="mixtral-jax", description="Mixtral sparse mixture-of-experts models in JAX / Flax NNX.",
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--version", action="store_true", help="print the version and exit")
  sub = p.add_subparsers(dest="command", metavar="COMMAND")
  for name, (_, help_) in COMMANDS.items():
    sub.add_parser(name, help=help_, add_help=False)
  return p


# (command, its first argument or None) -> (extra, the modules it brings): checked before anything loads, so a
# missing extra is one line naming the pip command, not a ModuleNotFoundError after the model has loaded.
EXTRAS = {("serve", None): ("serve", ("fastapi", "uvicorn")), ("eval", "harness"): ("eval", ("lm_eval",))}


def missing_extra(argv: list[str]) -> str | None:
  """The one-line error for a command whose optional dependencies are not installed, else None."""
  for (command, sub), (extra, modules) in EXTRAS.items():
    if argv[0] != command or (sub is not None and argv[1:2] != [sub]):
      continue
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
      what = " ".join(argv[:1] + ([sub] if sub else []))
      return (f"mixtral-jax {what} needs {', '.join(absent)}, from the '{extra}' extra: pip install "
              f"'mixtral-jax[{extra}]' (in a checkout: pip install -e '.[{extra}]')")
  return None


def quiet_libtpu(command: str) -> None:
  """On a host with libtpu installed but no TPU, keeps libtpu's start-up from printing an alarming
  ``E0000 ... TPU_WORKER_HOSTNAMES`` line (and a host-bounds warning) on every command: it looks for TPU
  workers that do not exist. libtpu then serves only ahead-of-time compiles (``plan --topology``, which
  sets its own accelerator type). Variables already set win; a host with TPU chips is left alone."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or importlib.util.find_spec("libtpu") is None:
    return
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  if command != "plan":
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")


def quiet_cuda_plugin() -> None:
  """On a host with JAX's CUDA plugin installed (the test extra brings it, for deviceless GPU compiles)
  but no NVIDIA device, JAX's first use prints a ``cuInit(0) failed: Unknown CUDA error 303`` traceback
  before falling back to the CPU. With no GPU and no TPU device there is nothing but the CPU to run on,
  so ``JAX_PLATFORMS`` defaults to ``cpu`` then. A value the user set wins. ``plan`` too: its deviceless
  compiles need no backend of this host's (TPU topologies come from libtpu, GPU ones from the CUDA
  plugin, both with JAX on the CPU)."""
  if ("JAX_PLATFORMS" in os.environ or glob.glob("/dev/nvidia[0-9]*")
      or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
      or importlib.util.find_spec("jax_plugins") is None
      or importlib.util.find_spec("jax_plugins.xla_cuda12") is None):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"  # for child processes
  if "jax" in sys.modules:  # `import mixtral_jax` has loaded JAX (it reads the variable once, at import)
    sys.modules["jax"].config.update("jax_platforms", "cpu")  # before any backend starts


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in COMMANDS:
    args = _top_parser().parse_args(argv)
    if args.version:
      from mixtral_jax import __version__
      print(__version__)
      return 0
    _top_parser().print_help()
    return 0 if not argv else 2
  name = argv[0]
  quiet_libtpu(name)
  quiet_cuda_plugin()
  if "-h" not in argv and "--help" not in argv and (error := missing_extra(argv)):
    print(f"mixtral-jax {name}: error: {error}", file=sys.stderr)
    return 2
  module, parser = command_parser(name)
  args = parser.parse_args(argv[1:])
  try:
    return int(getattr(module, f"{name}_main")(args) or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one clear line, no trace
    print(f"mixtral-jax {name}: error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 - only a full or read-only disk somewhere in the chain is caught
    disk = disk_cause(e)
    if disk is None:
      raise
    # A wrapped one (a training save that failed in the background) keeps its own message, which names
    # the step and the checkpoints kept, instead of the chained tracebacks.
    line = disk_error_line(disk) if disk is e else f"{disk_error_line(disk)} ({e})"
    print(f"mixtral-jax {name}: error: {line}", file=sys.stderr)
    return 2


def disk_cause(e: BaseException) -> OSError | None:
  """The first OSError with an errno in DISK_ERRNOS in ``e``'s chain (``raise ... from``, or raised while
  handling), else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


if __name__ == "__main__":
  sys.exit(main())
