"""`mixtral-jax train` end to end from a converted checkpoint, and the loop's failure paths.

- continue-pretrain and sft, which leave model.checkpoint open, take it from --checkpoint;
- continue-pretrain (as shipped: bf16 compute, full remat, gradient accumulation) starts from exactly
  the checkpoint's weights, its first loss is the checkpoint model's own loss on the batch, the loss
  falls on repeated text, and the run's (sharded) checkpoint loads and exports whole;
- sft trains on chat JSONL, counting only assistant tokens, and writes metrics.jsonl;
- a multi-process barrier that one process never reaches raises TimeoutError naming that process;
- a background checkpoint save that fails stops the run at the next step, and the run resumes from
  the last good checkpoint.
"""

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
import mixtral_jax.checkpoint
from mixtral_jax.cli import main as cli
from mixtral_jax.train import loop
from mixtral_jax.train.checkpointing import CheckpointError, Checkpointer
from test_train_loop import compilation_cache, small_config

pytestmark = pytest.mark.slow

T = 32  # continue-pretrain sequence length
ROWS = 16  # rows of the continue-pretrain corpus: exactly one batch, so batch 1 is all of them
HEAD_SCALE = 8.0  # sharpens the checkpoint's predictions: its loss (about 12) is its own, not ln V
PARAGRAPH = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
             "single step. Rivers run to the sea, and the sea is never full. ")
RUN = ["--set", "train.peak_flops=1e11", "--set", "train.progress=false", "--set", "optimizer.warmup_steps=1"]


# ------------------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A converted checkpoint of the tiny preset (V 32000, the v1 tokenizer's), LM head scaled up."""
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny"), seed=7)
  model.head_DV[...] = model.head_DV[...] * HEAD_SCALE
  return mixtral_jax.checkpoint.save(model, tmp_path_factory.mktemp("ckpt") / "tiny")


def params_of(model) -> dict:
  """Flat {path: float32 host array} of a model's parameters."""
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def corpus_tokens(tokenizer) -> tuple[str, np.ndarray]:
  """Repeated text whose document ``<s> text </s>`` cuts into exactly ROWS rows of T tokens, and its tokens."""
  for k in range(1, 200):
    tokens = np.asarray(tokenizer.encode(PARAGRAPH * k, bos=True, eos=True), np.int32)
    if (len(tokens) - 1) // T == ROWS:
      return PARAGRAPH * k, tokens
  raise AssertionError("no repetition count gives exactly ROWS rows")


def reference_loss(model, tokens: np.ndarray) -> float:
  """Mean next-token cross-entropy of the model's own float32 forward over rows of T + 1 tokens (each
  row its own context), computed without the training code."""
  x = np.stack([tokens[i * T: i * T + T + 1] for i in range((len(tokens) - 1) // T)])
  logp = jax.nn.log_softmax(model(jnp.asarray(x[:, :-1])), axis=-1)
  return -float(np.mean(np.take_along_axis(np.asarray(logp), x[:, 1:, None], axis=-1)))


def metrics(workdir) -> dict[int, dict]:
  return {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def train(config: str, workdir, ckpt, data, *args) -> int:
  return cli(["train", "--config", config, "--workdir", str(workdir), "--checkpoint", str(ckpt),
              "--set", f"data.paths=[{data}]", *RUN, *args])


# ------------------------------------------------------------------------------ continue-pretrain, sft


def test_checkpoint_flag_completes_a_config_that_leaves_it_open(capsys):
  """continue-pretrain and sft leave model.checkpoint to --checkpoint: the run config is checked once
  the flags are applied, and without the flag the error says what is missing."""
  for name in ("continue-pretrain", "sft"):
    assert cli(["train", "--config", name, "--workdir", "unused", "--checkpoint", "ckpt/x", "--print-config"]) == 0
    assert "checkpoint: ckpt/x" in capsys.readouterr().out
  assert cli(["train", "--config", "sft", "--workdir", "unused", "--print-config"]) == 2
  assert "set model.preset or model.checkpoint" in capsys.readouterr().err


def test_continue_pretrain_starts_from_the_checkpoint_and_lowers_the_loss(ckpt, tmp_path):
  """Through the CLI with the shipped config (bf16, full remat, 2 microbatches here): step 1 (learning
  rate 0 at the warmup's start) leaves the checkpoint's parameters bit for bit, its loss is the loaded
  model's loss on the batch (the whole corpus) within bf16 error, later steps lower the loss, and the
  run's checkpoint, its parameters sharded over 8 devices, loads and exports whole."""
  tokenizer = mixtral_jax.Tokenizer.load("v1")
  text, tokens = corpus_tokens(tokenizer)
  (tmp_path / "corpus.txt").write_text(text)
  workdir = tmp_path / "run"
  assert train("continue-pretrain", workdir, ckpt, tmp_path / "corpus.txt", "--steps", "4", "--batch-size",
               str(ROWS), "--grad-accum", "2", "--seq-len", str(T), "--lr", "1e-2",
               "--set", "train.checkpoint_every=1", "--set", "train.keep=5") == 0

  used = (workdir / "train_config.yaml").read_text()
  assert "dtype: bfloat16" in used and "remat: full" in used and str(ckpt) in used
  m = metrics(workdir)
  assert sorted(m) == [1, 2, 3, 4] and m[1]["lr"] == 0.0 and m[2]["lr"] > 0
  start = mixtral_jax.from_pretrained(ckpt)
  want = params_of(start)
  after_step_1 = params_of(mixtral_jax.from_pretrained(workdir / "checkpoints" / "1"))
  assert set(after_step_1) == set(want)
  for k in want:
    np.testing.assert_array_equal(after_step_1[k], want[k], err_msg=k)
  final = params_of(mixtral_jax.from_pretrained(workdir))
  assert any(not np.array_equal(final[k], want[k]) for k in want), "training did not move the parameters"
  exported = params_of(mixtral_jax.from_pretrained(mixtral_jax.checkpoint.export(workdir, tmp_path / "hf")))
  for k in final:  # the run's FSDP-sharded checkpoint exports whole
    np.testing.assert_array_equal(exported[k], final[k], err_msg=k)

  ref = reference_loss(start, tokens)
  assert abs(ref - math.log(32000)) > 1.0, ref  # the checkpoint's own loss, not any random model's
  np.testing.assert_allclose(m[1]["ce_loss"], ref, rtol=1e-3)  # another seed: 11.48
  assert m[4]["loss"] < m[1]["loss"] - 2.0, [m[s]["loss"] for s in sorted(m)]


def chat_lines() -> list[str]:
  """Single- and multi-turn conversations (one with a system prompt), repeated: 60 JSONL lines."""
  capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
              ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa")]
  convs = [[{"role": "user", "content": f"What is the capital of {c}?"},
            {"role": "assistant", "content": f"The capital of {c} is {city}."}] for c, city in capitals]
  convs.append([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5."}, {"role": "user", "content": "And times 4?"},
                {"role": "assistant", "content": "20."}])
  convs.append([{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}])
  return [json.dumps({"messages": c}) for c in convs * 6]


def test_sft_trains_on_chat_jsonl(ckpt, tmp_path):
  """Through the CLI with the shipped sft config: every step's loss is finite, the loss falls over
  repeated conversations, the loss counts only part of the tokens (the assistant turns), and every
  step is in metrics.jsonl."""
  (tmp_path / "chats.jsonl").write_text("\n".join(chat_lines()) + "\n")
  workdir = tmp_path / "run"
  B, S = 16, 64
  assert train("sft", workdir, ckpt, tmp_path / "chats.jsonl", "--steps", "4", "--batch-size", str(B),
               "--seq-len", str(S), "--lr", "1e-2") == 0

  m = metrics(workdir)
  assert sorted(m) == [1, 2, 3, 4]
  assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in m.values())
  assert all(0 < r["tokens"] < B * S / 2 for r in m.values()), [r["tokens"] for r in m.values()]
  assert m[4]["loss"] < m[1]["loss"] - 2.0, [m[s]["loss"] for s in sorted(m)]
  assert os.path.isdir(workdir / "checkpoints" / "4" / "params")


# ------------------------------------------------------------------------------ barrier timeout


@pytest.mark.multiprocess
def test_barrier_timeout_names_the_missing_process(child_env, free_port):
  """2 real processes (jax.distributed over 127.0.0.1) pass one barrier together; at the next, which
  process 1 never reaches, process 0 raises TimeoutError naming process 1 after its 3 s timeout."""
  env = child_env()
  worker = os.path.join(os.path.dirname(__file__), "barrier_worker.py")
  port = free_port()
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), "3"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    out0, err0 = procs[0].communicate(timeout=120)
  finally:
    procs[1].kill()
  out1, _ = procs[1].communicate(timeout=30)
  assert procs[0].returncode == 0, err0[-4000:]
  reports = [json.loads(line) for out in (out0, out1) for line in out.splitlines() if line.startswith("{")]
  assert {"process": 0, "passed": "start"} in reports and {"process": 1, "passed": "start"} in reports, reports
  outcome = next(r for r in reports if "error" in r)
  assert outcome["error"] == "TimeoutError", outcome
  assert "process(es) [1] of 2 did not arrive" in outcome["message"], outcome
  assert 2.5 <= outcome["waited_s"] < 10.0, outcome  # it waited out its timeout, no longer


# ------------------------------------------------------------------------------ failed background save


class _SettledCheckpointer(Checkpointer):
  """Runs each step's error check only once any background save has ended, so the step at which a
  failed save surfaces does not depend on how fast the save thread runs."""

  def check_for_errors(self) -> None:
    deadline = time.monotonic() + 60
    while self.manager.is_saving_in_progress() and time.monotonic() < deadline:
      time.sleep(0.02)
    super().check_for_errors()


def test_failed_background_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
  """Step 2's asynchronous save fails in its background thread (its final commit raises "no space
  left"). The run stops during step 3, before logging it, with a CheckpointError naming step 2 and the
  kept step 1; rerun, it resumes from step 1, the last good checkpoint."""
  from orbax.checkpoint._src.checkpointers import async_checkpointer  # the background save's final commit

  commit = async_checkpointer._on_commit_callback

  def failing_commit(tmpdir, *args, **kwargs):
    if tmpdir.get_final().name == "2":
      raise OSError(28, "No space left on device")
    return commit(tmpdir, *args, **kwargs)

  monkeypatch.setattr(async_checkpointer, "_on_commit_callback", failing_commit)
  monkeypatch.setattr(loop, "Checkpointer", _SettledCheckpointer)
  cfg = small_config("train.steps=4", "train.checkpoint_every=1", "train.eval_every=0")
  workdir = str(tmp_path / "run")
  with compilation_cache(tmp_path / "jax_cache"):
    with pytest.raises(CheckpointError, match=r"save of step 2 .* failed .*No space left on device.*"
                                              r"checkpoints of steps \[1\] are kept"):
      loop.run(cfg, workdir)
    assert sorted(metrics(workdir)) == [1, 2]
    monkeypatch.undo()
    resumed = loop.run(cfg, workdir)
  assert resumed.start_step == 1 and resumed.final_step == 4
