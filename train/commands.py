"""``mixtral-jax train``: pretrain, continue-train or fine-tune from a run config.

  mixtral-jax train --config tiny-pretrain --workdir runs/tiny
  mixtral-jax train --config sft --workdir runs/sft --set model.checkpoint=ckpt/8x7b-instruct \\
      --set data.paths=[chats.jsonl]

Rerunning the same command resumes from the newest checkpoint in the workdir. Exit codes: 0 done, 2 a bad
input (one line), 75 (``PREEMPTED_EXIT_CODE``) stopped by SIGTERM after saving: rerun to resume.
"""

from __future__ import annotations

import argparse

from .config import load_config, packaged_configs

# plain flag -> run-config key
FLAGS = {
    "steps": "train.steps", "batch_size": "data.batch_size", "seq_len": "data.seq_len", "lr": "optimizer.lr",
    "mesh": "train.mesh", "seed": "train.seed", "grad_accum": "optimizer.grad_accum",
    "checkpoint": "model.checkpoint", "profile": "train.profile", "remat": "train.remat",
}


train_example = "mixtral-jax train --config tiny-pretrain --workdir runs/tiny"


def train_parser(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="tiny-pretrain",
                 help=f"a packaged run config ({', '.join(packaged_configs())}) or a YAML file")
  p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, the tokenizer")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="override a run-config value (YAML syntax), e.g. --set optimizer.lr=1e-3; repeatable")
  p.add_argument("--restart", action="store_true",
                 help="start from step 0 even if the workdir holds checkpoints (they are moved aside)")
  p.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
  p.add_argument("--batch-size", type=int, help="global sequences per step (data.batch_size)")
  p.add_argument("--seq-len", type=int, help="tokens per sequence (data.seq_len)")
  p.add_argument("--lr", type=float, help="peak learning rate (optimizer.lr)")
  p.add_argument("--grad-accum", type=int, help="microbatches per step (optimizer.grad_accum)")
  p.add_argument("--mesh", help='device mesh, e.g. "data=2,expert=4" (train.mesh)')
  p.add_argument("--seed", type=int, help="initialisation and data-order seed (train.seed)")
  p.add_argument("--checkpoint", help="start from this converted model checkpoint (model.checkpoint)")
  p.add_argument("--profile", metavar="START:END", help="jax.profiler trace of these steps in WORKDIR/profile (train.profile)")
  p.add_argument("--remat", help="remat policy: none, save_projections, dots, save_attn_moe_in, offload, "
                                 "offload_projections, offload_gate_up, full (train.remat)")
  p.add_argument("--print-config", action="store_true", help="print the resolved run config and exit")
  mp = p.add_argument_group("multi-process (one command per process; also from MIXTRAL_*/JAX_* variables)")
  mp.add_argument("--coordinator", help="host:port of process 0")
  mp.add_argument("--num-processes", type=int, help="how many processes take part (default: auto-detected, else 1)")
  mp.add_argument("--process-id", type=int,
                  help="this process's index, 0 to --num-processes - 1 (default: auto-detected)")
  mp.add_argument("--local-devices", type=int, help="CPU devices this process simulates (testing)")


def train_main(args) -> int:
  from .loop import configure_logging, run  # noqa: PLC0415 - keeps --help fast
  from .checkpointing import PREEMPTED_EXIT_CODE  # noqa: PLC0415
  from .metrics import read_metrics, summary  # noqa: PLC0415

  flags = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
  cfg = load_config(args.config, args.overrides, flags)
  if args.print_config:
    import yaml  # noqa: PLC0415
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
  from mixtral_jax.sharding import distributed  # noqa: PLC0415
  distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.local_devices)
  configure_logging()
  result = run(cfg, args.workdir, restart=args.restart)
  # The whole run's story, resumed parts included, is in metrics.jsonl (process 0 writes it); another
  # process, or a run whose file is elsewhere, summarises what it saw itself.
  records = read_metrics(args.workdir) or [
      {"step": s, "loss": loss, **({"eval_loss": result.eval_losses[s]} if s in result.eval_losses else {})}
      for s, loss in sorted(result.losses.items())]
  print(summary(records) + f"; checkpoints in {args.workdir}/checkpoints")
  # A scheduler reads 0 as "finished"; a SIGTERM-stopped run saved its step and wants a rerun.
  return PREEMPTED_EXIT_CODE if result.stopped_by_signal else 0
