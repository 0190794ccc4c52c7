"""The data pipeline: SFT loss masks on hand-built conversations, packing, resumable and per-process
batches, and bad input that stops the run before anything compiles."""

import json
import os

import jax
import numpy as np
import pytest

from mixtral_jax.chat import encode_chat
from mixtral_jax.config import MixtralConfig
from mixtral_jax.sharding.mesh import make_mesh
from mixtral_jax.tokenizer import Tokenizer
from mixtral_jax.train import data as data_lib
from mixtral_jax.train import loop
from mixtral_jax.train import step as step_lib
from mixtral_jax.train.config import TrainConfig, load_config

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course"},
]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_sft_weights_cover_exactly_the_assistant_turns(version):
  tok = Tokenizer.load(version)
  tokens, weights = data_lib.assistant_spans(CHAT, version)
  # The sequence is mistral-common's own encoding of the conversation, then </s>.
  assert tokens == encode_chat(CHAT[:-1] + [{**CHAT[-1], "prefix": True}], version=version) + [tok.eos_id]
  w = np.asarray(weights)
  runs = np.split(np.arange(len(w)), np.flatnonzero(np.diff(w)) + 1)
  learned = [[tokens[i] for i in r] for r in runs if w[r[0]] == 1]
  assert [tok.decode(r).strip() for r in learned] == ["Paris", "Rome, of course"]
  assert all(r[-1] == tok.eos_id for r in learned)  # each turn's </s> is learned too
  assert w.sum() == sum(len(r) for r in learned)


@pytest.mark.slow
def test_sft_loss_ignores_prompt_tokens():
  """Hand-built packed batches: changing prompt targets leaves the loss unchanged; changing an
  assistant target changes it."""
  cfg = MixtralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
  train = TrainConfig().override({"data.batch_size": 1, "data.seq_len": 64, "loss.ce_chunk": 64})
  mesh = make_mesh(None, devices=jax.devices()[:1])
  examples = [data_lib.assistant_spans(CHAT, "v1"), data_lib.assistant_spans(CHAT[1:3], "v1")]
  assert data_lib.first_fit([len(t) for t, _ in examples], 64 + 1) == [[0, 1]]
  row = data_lib.pack_conversations(examples, 64, pad_id=0)
  assert set(np.unique(row["segment_ids"])) == {0, 1, 2}  # two conversations and padding
  batch = {k: v[None, None] for k, v in row.items()}
  params = step_lib.init_state(cfg, train, mesh).params
  evaluate = step_lib.build_eval_step(cfg, train, mesh)
  nll = lambda b: float(evaluate(params, b)[0])
  prompt = np.flatnonzero(row["weights"] == 0)
  answer = np.flatnonzero(row["weights"] == 1)
  changed_prompt = {**batch, "targets": batch["targets"].copy()}
  changed_prompt["targets"][0, 0, prompt] = (changed_prompt["targets"][0, 0, prompt] + 7) % 32000
  changed_answer = {**batch, "targets": batch["targets"].copy()}
  changed_answer["targets"][0, 0, answer[0]] += 1
  assert nll(changed_prompt) == nll(batch)
  assert nll(changed_answer) != nll(batch)


def test_text_rows_pack_documents():
  tokens = np.arange(100, 120, dtype=np.int32)
  starts = np.isin(np.arange(20), [0, 5, 7])  # documents [0,5) [5,7) [7,20)
  r = data_lib.pack_window(tokens[:9], starts[:9])  # doc 0 (5 tokens), doc 1 (2), doc 2 (1 + the shifted target)
  np.testing.assert_array_equal(r["inputs"], np.arange(100, 108))
  np.testing.assert_array_equal(r["targets"], np.arange(101, 109))
  np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 3])
  np.testing.assert_array_equal(r["positions"], [0, 1, 2, 3, 4, 0, 1, 0])
  np.testing.assert_array_equal(r["weights"], [1, 1, 1, 1, 0, 1, 0, 1])  # no target across a boundary
  r = data_lib.pack_window(tokens[8:17], starts[8:17])  # starts inside doc 2: a fresh segment at position 0
  np.testing.assert_array_equal(r["segment_ids"], np.ones(8))
  np.testing.assert_array_equal(r["positions"], np.arange(8))


class _Rows:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"inputs": np.full(4, i, np.int32)}


def test_batches_resume_exactly_and_split_over_processes():
  it = data_lib.BatchIterator(_Rows(10), batch_size=4, grad_accum=2, seed=3)
  seen = [next(it)["inputs"][..., 0] for _ in range(5)]  # crosses an epoch (2 batches per epoch)
  assert all(s.shape == (2, 2) for s in seen)
  assert sorted(np.concatenate([s.ravel() for s in seen[:2]])) == sorted(set(np.concatenate([s.ravel() for s in seen[:2]])))
  resumed = data_lib.BatchIterator(_Rows(10), batch_size=4, grad_accum=2, seed=3)
  again = data_lib.BatchIterator(_Rows(10), batch_size=4, grad_accum=2, seed=3)
  for _ in range(3):
    next(again)
  resumed.restore(json.loads(json.dumps(again.state())))  # the state goes through JSON in the checkpoint
  np.testing.assert_array_equal(next(resumed)["inputs"], seen[3][..., None].repeat(4, -1))
  halves = [data_lib.BatchIterator(_Rows(10), batch_size=4, grad_accum=2, seed=3, local=slice(p, p + 1))
            for p in range(2)]
  for s in seen:
    parts = [next(h)["inputs"][..., 0] for h in halves]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), s)


# ---------------------------------------------------------------------- bad input, before compiling


@pytest.fixture
def no_compile(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("the train step was built before the input was checked")
  monkeypatch.setattr(loop.step_lib, "build_train_step", refuse)


def _cfg(tmp_path, *extra):
  return load_config("tiny-pretrain", ["train.progress=false", "train.peak_flops=1e11", *extra])


def test_empty_directory(tmp_path, no_compile):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no input files"):
    loop.run(_cfg(tmp_path, f"data.paths=[{tmp_path / 'empty'}]"), str(tmp_path / "run"))


def test_unreadable_file(tmp_path, no_compile):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a.py").write_text("x = 1\n" * 50)
  (tmp_path / "d" / "b.py").write_bytes(b"caf\xe9 = 1\n")
  with pytest.raises(ValueError, match=r"cannot read .*b\.py: not UTF-8"):
    loop.run(_cfg(tmp_path, f"data.paths=[{tmp_path / 'd'}]", "data.heldout_fraction=0"), str(tmp_path / "run"))


def test_sequence_longer_than_context(tmp_path, no_compile):
  with pytest.raises(ValueError, match=r"data.seq_len=4096 is longer than the model's context"):
    loop.run(_cfg(tmp_path, "data.seq_len=4096"), str(tmp_path / "run"))
  chats = tmp_path / "chats.jsonl"
  chats.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": [
      {"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "ok"}]}) + "\n")
  with pytest.raises(ValueError, match=r"chats\.jsonl:2: the conversation has \d+ tokens, longer than data.seq_len=256"):
    loop.run(_cfg(tmp_path, "data.format=chat", f"data.paths=[{chats}]", "data.heldout_fraction=0"),
             str(tmp_path / "run"))


def test_tokenizer_vocabulary_mismatch(tmp_path, no_compile):
  with pytest.raises(ValueError, match="32000 tokens but the tokenizer .* has 32768"):
    loop.run(_cfg(tmp_path, "data.tokenizer=v3"), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
