"""QLoRA quality: held-out loss of LoRA SFT on a bf16, an nf4 and an int8 frozen base (issue 21 targets:
nf4 within 2% of bf16, int8 within 1%).

  python benchmarks/qlora_quality.py --out runs/qlora_quality [--pretrain-steps 120] [--sft-steps 40]

1. The base: ``mixtral-jax train --config tiny-pretrain``, shortened to ``--pretrain-steps`` (the tiny
   preset with head_dim 64, which nf4 needs, on the standard library's source; skipped when ``OUT/base``
   already holds a run).
2. SFT data the base can learn from: chat conversations made from the standard library's own functions
   (user: "Write the Python function NAME(ARGS) of module M."; assistant: its source, cut to fit a row),
   written to ``OUT/chats/<module>.jsonl``; held out by file (``data.heldout_fraction`` 0.1).
3. Three runs of the shipped ``lora-sft`` recipe (rank 16 on q, k, v, o, w1, w2, w3; bf16 compute, remat
   full), shortened (``--sft-steps``, 8 x 256 rows, lr ``--lr``), from the same base and seed, with
   ``lora.base_quantize`` none (the bf16 base), nf4 and int8. Each logs the held-out loss every
   ``--eval-every`` steps to its ``metrics.jsonl``.
4. Prints the held-out loss curves as a Markdown table and the final relative differences.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import sysconfig
import time

MODES = ("none", "nf4", "int8")


def stdlib_chats(directory: str, limit: int, seq_len: int, max_chars: int = 600) -> int:
  """Writes up to ``limit`` conversations (module docstring, step 2) that fit a row of ``seq_len`` + 1
  tokens, one JSONL file per module under ``directory`` (chat data is held out by file); returns how
  many."""
  from mixtral_jax.train.data.chat import assistant_spans  # noqa: PLC0415 - mistral-common, slow to import
  root = sysconfig.get_paths()["stdlib"]
  n = 0
  os.makedirs(directory, exist_ok=True)
  for name in sorted(os.listdir(root)):
    if not name.endswith(".py") or n >= limit:
      continue
    try:
      source = open(os.path.join(root, name), encoding="utf-8").read()
      tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, OSError):
      continue
    with open(os.path.join(directory, name[:-3] + ".jsonl"), "w") as out:
      for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or n >= limit:
          continue
        code = ast.get_source_segment(source, node) or ""
        if not 80 <= len(code) <= max_chars:
          continue
        args = ", ".join(a.arg for a in node.args.args)
        messages = [{"role": "user", "content": f"Write the Python function {node.name}({args}) of module {name[:-3]}."},
                    {"role": "assistant", "content": code}]
        if len(assistant_spans(messages, "v1")[0]) > seq_len + 1:
          continue
        out.write(json.dumps({"messages": messages}) + "\n")
        n += 1
  return n


def run(cmd: list[str], log: str) -> float:
  t0 = time.perf_counter()
  with open(log, "w") as f:
    rc = subprocess.call([sys.executable, "-m", "mixtral_jax", *cmd], stdout=f, stderr=subprocess.STDOUT)
  if rc:
    raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}); see {log}")
  return time.perf_counter() - t0


def eval_curve(workdir: str) -> dict[int, float]:
  curve = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "eval_loss" in r:
        curve[int(r["step"])] = float(r["eval_loss"])
  return curve


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--pretrain-steps", type=int, default=120)
  p.add_argument("--sft-steps", type=int, default=40)
  p.add_argument("--eval-every", type=int, default=10)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--chats", type=int, default=600)
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  quiet = ["--set", "train.progress=false"]
  base = os.path.join(a.out, "base")
  times = {}
  if not os.path.isdir(os.path.join(base, "checkpoints")):
    # head_dim 64: nf4 packs o_NHD along H in blocks of 64 (tiny's own head_dim is 32)
    times["pretrain"] = run(["train", "--config", "tiny-pretrain", "--workdir", base, "--steps", str(a.pretrain_steps),
                             "--set", f"train.eval_every={a.pretrain_steps}", "--set", "model.overrides.head_dim=64",
                             *quiet], os.path.join(a.out, "pretrain.log"))
  chats = os.path.join(a.out, "chats")
  print(f"{stdlib_chats(chats, a.chats, 256)} conversations in {chats}", flush=True)
  curves = {}
  for mode in MODES:
    workdir = os.path.join(a.out, f"sft-{mode}")
    times[mode] = run(["train", "--config", "lora-sft", "--workdir", workdir, "--checkpoint", base, "--restart",
                       "--set", f"data.paths=[{chats}]", "--steps", str(a.sft_steps), "--seq-len", "256",
                       "--batch-size", "8", "--lr", str(a.lr), "--set", "optimizer.warmup_steps=5",
                       "--set", f"train.eval_every={a.eval_every}", "--set", "train.eval_batches=4",
                       "--set", "data.heldout_fraction=0.1", "--set", f"lora.base_quantize={'null' if mode == 'none' else mode}",
                       *quiet], os.path.join(a.out, f"sft-{mode}.log"))
    curves[mode] = eval_curve(workdir)
  steps = sorted(curves["none"])
  print("| step | " + " | ".join(f"held-out loss, {'bf16' if m == 'none' else m} base" for m in MODES) + " |")
  print("|---|" + "---|" * len(MODES))
  for s in steps:
    print(f"| {s} | " + " | ".join(f"{curves[m].get(s, float('nan')):.4f}" for m in MODES) + " |")
  last = steps[-1]
  for m in ("nf4", "int8"):
    rel = (curves[m][last] - curves["none"][last]) / curves["none"][last]
    print(f"{m}: final held-out loss {curves[m][last]:.4f} vs bf16 base {curves['none'][last]:.4f}: {100 * rel:+.2f}%")
  print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
  with open(os.path.join(a.out, "curves.json"), "w") as f:
    json.dump({"curves": curves, "seconds": times}, f, indent=1)


if __name__ == "__main__":
  main()
