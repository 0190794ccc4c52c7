"""Preference pairs as shards (``mixtral-jax tokenize --preference``): the round trip against encoding each
JSONL line directly (``preference.encode_pair``, the in-memory reader ``PairRows``), bad lines refused
with file:line and nothing half-written, and a DPO run from shards equal to a run from the JSONL."""

import json
import os
import zlib

import numpy as np
import pytest

import mixtral_jax
import mixtral_jax.checkpoint
from mixtral_jax.cli import main as cli
from mixtral_jax.train.data import ShardSet, load_manifest, make_rows, synthetic_preference
from mixtral_jax.train.data.pipeline import BatchIterator
from mixtral_jax.train.data.preference import PairRows, encode_pair
from mixtral_jax.train.data.shards import MANIFEST

FRACTION = 0.2


def _write_prefs(directory) -> str:
  """Synthetic pairs, plus one in the messages/assistant-message form, in one JSONL file."""
  records = synthetic_preference.sum_pairs(60, seed=0, max_operand=4)
  records.insert(7, {"messages": [{"role": "user", "content": "Say hi."}],
                     "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": "No."})
  path = os.path.join(directory, "prefs.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return path


def _direct(path):
  """(train, heldout) pairs by encoding every line directly, held out by the documented rule: a CRC of
  the file name and the line's byte offset below the fraction of 10,000."""
  train, held, offset = [], [], 0
  with open(path, "rb") as f:
    for raw in f:
      pair = encode_pair(json.loads(raw))
      key = zlib.crc32(f"{os.path.basename(path)}:{offset}".encode()) % 10_000
      (held if key < FRACTION * 10_000 else train).append(pair)
      offset += len(raw)
  return train, held


def _tokenize(path, out, *extra):
  return cli(["tokenize", path, "--preference", "--out", str(out), "--heldout-fraction", str(FRACTION),
              "--no-progress", "--workers", "1", *extra])


def test_round_trip_equals_direct_encoding(tmp_path):
  path = _write_prefs(tmp_path)
  out = tmp_path / "shards"
  assert _tokenize(path, out, "--shard-mb", "0.001") == 0  # about 1 KB a shard: several shards
  manifest = load_manifest(str(out))
  assert manifest["kind"] == "preference" and len(manifest["splits"]["train"]["shards"]) > 1
  train, held = _direct(path)
  assert len(held) > 0 and manifest["splits"]["heldout"]["documents"] == len(held)
  for split, pairs in (("train", train), ("heldout", held)):
    rows = make_rows(ShardSet(str(out), manifest, split), 24)
    assert [rows.pair(i) for i in range(len(rows))] == pairs
  # the streamed batches equal the in-memory reader's (shuffle included)
  seq_len = 24
  ours = BatchIterator(make_rows(ShardSet(str(out), manifest, "train"), seq_len), 8, 2, seed=5, threads=0, prefetch=0)
  ref = BatchIterator(PairRows(train, seq_len), 8, 2, seed=5, threads=0, prefetch=0)
  for _ in range(7):  # past one epoch (48 - 50 train pairs, 8 a batch)
    a, b = next(ours), next(ref)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("line, why", [
    ({"prompt": "What is 1+1?", "rejected": "3"}, "'chosen' answer is missing"),
    ({"prompt": "What is 1+1?", "chosen": "2"}, "'rejected' answer is missing"),
    ({"prompt": "What is 1+1?", "chosen": "2", "rejected": "  "}, "'rejected' is an empty answer"),
    ({"prompt": "What is 1+1?", "chosen": [{"role": "assistant", "content": ""}], "rejected": "3"},
     "'chosen' is an empty answer"),
])
def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path, capsys, line, why):
  path = tmp_path / "bad.jsonl"
  good = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
  path.write_text("\n".join(json.dumps(r) for r in (good, good, line, good)) + "\n")
  out = tmp_path / "shards"
  assert _tokenize(str(path), out) == 2
  err = capsys.readouterr().err
  assert f"{path}:3:" in err and why in err
  assert not os.path.exists(out / MANIFEST) and not [n for n in os.listdir(out) if not n.startswith(".tmp")]


def test_preference_shards_refused_for_sft_and_text_shards_for_dpo(tmp_path, capsys):
  path = _write_prefs(tmp_path)
  assert _tokenize(path, tmp_path / "p") == 0
  base = _tiny_base(tmp_path)
  small = [*RUN, "--steps", "1", "--seq-len", "24", "--batch-size", "8"]
  rc = cli(["train", "--config", "lora-sft", "--workdir", str(tmp_path / "w"), "--checkpoint", base,
            "--set", f"data.paths=[{tmp_path / 'p'}]", *small])
  assert rc == 2 and "holds preference shards but data.format=chat" in capsys.readouterr().err
  (tmp_path / "doc.txt").write_text("some text to train on " * 50)
  assert cli(["tokenize", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
  rc = cli(["train", "--config", "dpo-lora", "--workdir", str(tmp_path / "w2"), "--checkpoint", base,
            "--set", f"data.paths=[{tmp_path / 't'}]", *small])
  assert rc == 2 and "holds text shards but data.format=preference" in capsys.readouterr().err


RUN = ["--set", "train.peak_flops=1e11", "--set", "train.progress=false", "--set", "optimizer.warmup_steps=1"]


def _tiny_base(tmp_path) -> str:
  cfg = mixtral_jax.get_config("tiny", num_hidden_layers=1)
  return str(mixtral_jax.checkpoint.save(mixtral_jax.create_model(cfg, seed=3), tmp_path / "base"))


def _dpo(base, data, workdir) -> list[dict]:
  rc = cli(["train", "--config", "dpo-lora", "--workdir", str(workdir), "--checkpoint", base,
            "--set", f"data.paths=[{data}]", *RUN, "--steps", "3", "--batch-size", "8", "--seq-len", "24",
            "--lr", "2e-3", "--set", "loss.ce_chunk=24", "--set", "train.eval_every=3",
            "--set", f"data.heldout_fraction={FRACTION}", "--set", "model.overrides.dtype=float32"])
  assert rc == 0
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_dpo_from_shards_equals_dpo_from_jsonl(tmp_path):
  path = _write_prefs(tmp_path)
  assert _tokenize(path, tmp_path / "shards", "--shard-mb", "0.001") == 0
  base = _tiny_base(tmp_path)
  from_jsonl = _dpo(base, path, tmp_path / "a")
  from_shards = _dpo(base, tmp_path / "shards", tmp_path / "b")
  keys = ("loss", "dpo_loss", "reward_margin", "accuracy", "eval_loss", "eval_accuracy")
  assert len(from_jsonl) == len(from_shards) == 3
  assert from_jsonl[-1]["reward_margin"] != 0.0 and "eval_accuracy" in from_jsonl[-1]
  for a, b in zip(from_jsonl, from_shards):
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
