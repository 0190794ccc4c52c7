"""Goodput (wall time split into compute, data wait, checkpoint, eval, compile) and ``train.profile``.

References: ``time.sleep`` of known lengths for the phases, a fresh ``jax.jit`` compile for the compile
phase (JAX's own monitoring events, measured independently by the wall clock around it), and the files
``jax.profiler`` writes."""

import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import pytest

from mixtral_jax.train import loop
from mixtral_jax.train.config import TrainConfig, load_config
from mixtral_jax.train.profiling import Goodput, parse_profile, summary_line


def test_goodput_splits_phases_and_moves_compile_out_of_compute():
  timer = Goodput()
  try:
    with timer.phase("data_wait"):
      time.sleep(0.05)
    with timer.phase("compute"):
      t0 = time.perf_counter()
      f = jax.jit(lambda x: jnp.sin(x) @ x.T + 3.0)  # a program never compiled before: compile time
      jax.block_until_ready(f(jnp.ones((31, 17))))
      compute_wall = time.perf_counter() - t0
    rec = timer.step_record()
    assert 0.05 <= rec["time/data_wait_s"] < 0.5
    assert rec["time/compile_s"] > 0
    assert rec["time/compute_s"] + rec["time/compile_s"] == pytest.approx(compute_wall, rel=0.05, abs=5e-3)
    with timer.phase("checkpoint"):
      time.sleep(0.02)
    s = timer.summary()
    parts = sum(s[k] for k in ("compute_s", "data_wait_s", "checkpoint_s", "eval_s", "compile_s", "other_s"))
    assert parts == pytest.approx(s["wall_s"], rel=1e-6)
    assert s["checkpoint_s"] >= 0.02 and 0 < s["goodput"] < 1
    assert summary_line(s).startswith("goodput ")
  finally:
    timer.close()


def test_profile_range_outside_the_run_is_one_line():
  assert parse_profile("2:3", 5) == (2, 3) and parse_profile(None, 5) is None
  with pytest.raises(ValueError, match=r"train.profile '4:9' is outside the run's steps 1..5; choose 1 <= START"):
    parse_profile("4:9", 5)
  with pytest.raises(ValueError, match=r"expected START:END"):
    parse_profile("10-15", 50)
  with pytest.raises(ValueError, match=r"quote the range"):
    parse_profile(615, 50)
  with pytest.raises(ValueError, match=r"train.profile '0:2' is outside"):
    TrainConfig().override({"train.steps": 10, "train.profile": "0:2", "model.preset": "tiny"})
  with pytest.raises(ValueError, match=r"train.remat='half' is no remat policy; choose one of none"):
    TrainConfig().override({"train.remat": "half", "model.preset": "tiny"})


@pytest.mark.slow
def test_run_writes_trace_and_goodput(tmp_path):
  cfg = load_config("tiny-pretrain", [
      "model.overrides={hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2}",
      "data.max_files=6", "data.seq_len=32", "data.batch_size=8", "train.steps=3", "train.checkpoint_every=3",
      "train.eval_every=0", "train.peak_flops=1e11", "train.progress=false", "loss.ce_chunk=16",
      "train.profile='2:3'", "train.remat=save_attn_moe_in"])
  workdir = str(tmp_path)
  loop.run(cfg, workdir)
  assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert records[0]["time/compile_s"] > 0  # the first step compiles the train step
  for r in records:
    assert {"time/compute_s", "time/data_wait_s", "time/checkpoint_s", "time/compile_s"} <= set(r)
  totals = json.load(open(os.path.join(workdir, "goodput.json")))
  assert totals["checkpoint_s"] > 0 and 0 < totals["goodput"] < 1
  assert totals["compile_s"] >= sum(r["time/compile_s"] for r in records) - 1e-6
