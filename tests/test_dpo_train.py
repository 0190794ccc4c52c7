"""DPO end to end through the CLI with the shipped dpo-lora config (and an nf4 base): a tiny converted
base, the synthetic correct-sum preference set; step 0 is the base (loss log 2, rewards 0), the train and
held-out rewards and accuracy are logged, the loss falls; DPO without LoRA is refused before compiling."""

import json
import math
import os

import pytest

import mixtral_jax
import mixtral_jax.checkpoint
from mixtral_jax.cli import main as cli
from mixtral_jax.train.data import synthetic_preference

pytestmark = pytest.mark.slow

RUN = ["--set", "train.peak_flops=1e11", "--set", "train.progress=false", "--set", "optimizer.warmup_steps=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  cfg = mixtral_jax.get_config("tiny", head_dim=64)  # nf4 packs o along H: a multiple of its 64-entry blocks
  model = mixtral_jax.create_model(cfg, seed=3)
  return str(mixtral_jax.checkpoint.save(model, tmp_path_factory.mktemp("base") / "tiny"))


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
  train, _ = synthetic_preference.write(str(tmp_path_factory.mktemp("prefs")), pairs=96, heldout=0, max_operand=4)
  return train


def _metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_dpo_lora_runs_logs_rewards_and_learns(base, prefs, tmp_path):
  workdir = tmp_path / "dpo"
  rc = cli(["train", "--config", "dpo-lora", "--workdir", str(workdir), "--checkpoint", base,
            "--set", f"data.paths=[{prefs}]", *RUN, "--steps", "6", "--batch-size", "8", "--seq-len", "32",
            "--lr", "2e-3", "--set", "loss.ce_chunk=32", "--set", "train.eval_every=6", "--set", "data.heldout_fraction=0.2",
            "--set", "lora.base_quantize=nf4", "--set", "model.overrides.dtype=float32"])
  assert rc == 0
  records = _metrics(workdir)
  first, last = records[0], records[-1]
  assert abs(first["dpo_loss"] - math.log(2)) < 1e-5 and first["reward_margin"] == 0.0
  for k in ("chosen_reward", "rejected_reward", "reward_margin", "accuracy"):
    assert k in last and "eval_" + k in last
  assert last["reward_margin"] != 0.0 and all(math.isfinite(last[k]) for k in ("dpo_loss", "eval_loss", "eval_accuracy"))
  assert json.load(open(workdir / "lora.json"))["lora"]["base_quantize"] == "nf4"
  # a QLoRA run's adapters are relative to the unquantized base: they export as a LoRA run's do
  assert cli(["export", str(workdir), str(tmp_path / "peft"), "--peft"]) == 0
  assert os.path.isfile(tmp_path / "peft" / "adapter_model.safetensors")
  assert cli(["export", str(workdir), str(tmp_path / "merged"), "--merge"]) == 0
  assert os.path.isfile(tmp_path / "merged" / "config.json")


def test_dpo_without_lora_is_refused(base, prefs, tmp_path, capsys):
  rc = cli(["train", "--config", "dpo-lora", "--workdir", str(tmp_path / "x"), "--checkpoint", base,
            "--set", f"data.paths=[{prefs}]", "--set", "lora.rank=null", *RUN])
  assert rc != 0
  assert "data.format=preference (DPO) needs LoRA" in capsys.readouterr().err
