"""Token shards and the Grain pipeline: tokenize checked against sentencepiece itself, rows against NumPy
windows of the same stream, batches independent of the process count and resumable from their JSON state,
mixtures in their weights' proportions, every bad input named, and a tokenize run killed with SIGKILL
that leaves only complete shards and finishes when rerun."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece

from mixtral_jax.tokenizer import Tokenizer
from mixtral_jax.train import data as data_lib
from mixtral_jax.train.config import load_config
from mixtral_jax.train.data.shards import verify_shard
from mixtral_jax.train.data.tokenize import TEXT_EXTENSIONS

TOK = Tokenizer.load("v1")
SP = sentencepiece.SentencePieceProcessor(model_file=TOK.path)  # the reference encoder
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def text(seed: int, words: int) -> str:
  rng = np.random.default_rng(seed)
  return " ".join(rng.choice(WORDS, words)) + "\n"


def spec(**kw):
  return data_lib.TokenizeSpec(tokenizer=TOK.path, **{"heldout_fraction": 0.0, **kw})


def reference_stream(docs: list[str]) -> np.ndarray:
  return np.concatenate([[TOK.bos_id] + SP.encode(d) + [TOK.eos_id] for d in docs])


def read_split(directory, split="train") -> np.ndarray:
  m = data_lib.load_manifest(directory)
  return np.concatenate([np.fromfile(os.path.join(directory, f"{s['name']}.tokens"), m["dtype"])
                         for s in m["splits"][split]["shards"]])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Text files, a JSONL file and a Parquet file; returns (dir, the documents in file order)."""
  root = tmp_path_factory.mktemp("corpus")
  docs = []
  for i in range(6):
    t = text(i, 300)
    (root / f"a{i}.txt").write_text(t)
    docs.append((f"a{i}.txt", t))
  lines = [text(100 + i, 40) for i in range(30)]  # about 9 KB: cut into byte ranges at shard_mb=0.004
  (root / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines)))
  rows = [text(200 + i, 50) for i in range(16)]  # 8 row groups, cut into row-group ranges
  pq.write_table(pa.table({"text": rows}), root / "c.parquet", row_group_size=2)
  ordered = sorted([(n, [t]) for n, t in docs] + [("b.jsonl", lines), ("c.parquet", rows)])
  return root, [d for _, ds in ordered for d in ds]


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shards") / "s")
  data_lib.tokenize([corpus[0]], out, spec(shard_mb=0.004), progress=False)
  return out


def test_tokenize_matches_sentencepiece_and_records_checksums(corpus, shards):
  _, docs = corpus
  m = data_lib.load_manifest(shards)
  assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 32000
  assert m["tokenizer"]["fingerprint"] == data_lib.tokenizer_fingerprint(TOK.path)
  want = reference_stream(docs)
  np.testing.assert_array_equal(read_split(shards), want)
  train = m["splits"]["train"]
  assert train["tokens"] == len(want) and train["documents"] == len(docs)
  pieces = [p for s in train["shards"] for p in json.load(open(os.path.join(shards, f"{s['name']}.json")))["sources"]]
  assert sum(p[0].endswith("b.jsonl") for p in pieces) >= 2 and sum(p[0].endswith("c.parquet") for p in pieces) >= 2
  for s in train["shards"]:
    for part, meta in s["files"].items():
      raw = open(os.path.join(shards, f"{s['name']}.{part}"), "rb").read()
      assert meta == {"bytes": len(raw), "crc32": f"{zlib.crc32(raw):08x}"}


def test_heldout_split_is_by_file_hash(corpus, tmp_path):
  root, _ = corpus
  out = str(tmp_path / "s")
  data_lib.tokenize([root], out, spec(heldout_fraction=0.3), progress=False)
  names = sorted(n for n in os.listdir(root) if n.endswith(TEXT_EXTENSIONS))
  held = [n for n in names if zlib.crc32(n.encode()) % 10_000 < 3_000]  # a CRC of the path under its root
  assert 0 < len(held) < len(names)
  m = data_lib.load_manifest(out)
  got = {split: sorted(os.path.basename(p) for s in m["splits"][split]["shards"]
                       for p, _ in json.load(open(os.path.join(out, f"{s['name']}.json")))["sources"])
         for split in ("train", "heldout")}
  assert sorted(set(got["heldout"])) == held
  assert sorted(set(got["train"])) == sorted(set(names) - set(held))


def test_text_rows_are_windows_of_each_shard(shards):
  m = data_lib.load_manifest(shards)
  rows = data_lib.TextRows(data_lib.ShardSet(shards, m, "train"), seq_len=16)
  i = 0
  for s in m["splits"]["train"]["shards"]:
    stream = np.fromfile(os.path.join(shards, f"{s['name']}.tokens"), m["dtype"]).astype(np.int32)
    for r in range((len(stream) - 1) // 16):
      w = stream[r * 16: r * 16 + 17]
      row = rows[i]
      np.testing.assert_array_equal(row["inputs"], w[:16])
      np.testing.assert_array_equal(row["targets"], w[1:])
      np.testing.assert_array_equal(row["weights"], w[1:] != TOK.bos_id)  # no target across documents
      i += 1
  assert i == len(rows)


class _Rows:
  def __init__(self, n, base=0):
    self.n, self.base = n, base

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"inputs": np.full(4, self.base + i, np.int32)}


def test_epochs_are_fresh_permutations_and_processes_split_columns():
  it = data_lib.BatchIterator(_Rows(12), batch_size=4, grad_accum=2, seed=5)
  ids = [next(it)["inputs"][..., 0].ravel() for _ in range(6)]  # 2 epochs of 3 batches
  epoch0, epoch1 = np.concatenate(ids[:3]), np.concatenate(ids[3:])
  assert sorted(epoch0) == sorted(epoch1) == list(range(12))
  assert not np.array_equal(epoch0, epoch1)
  again = data_lib.BatchIterator(_Rows(12), batch_size=4, grad_accum=2, seed=5)
  np.testing.assert_array_equal(next(again)["inputs"][..., 0].ravel(), ids[0])  # deterministic
  other = data_lib.BatchIterator(_Rows(12), batch_size=4, grad_accum=2, seed=6)
  assert not np.array_equal(np.concatenate([next(other)["inputs"][..., 0].ravel() for _ in range(3)]), epoch0)


def test_mixture_follows_the_weights_and_resumes_exactly():
  make = lambda: data_lib.BatchIterator([_Rows(50), _Rows(7, base=1000)], batch_size=8, grad_accum=1, seed=1,
                                        weights=[0.75, 0.25], names=["web", "code"])
  it = make()
  batches = [next(it)["inputs"][..., 0].ravel() for _ in range(40)]
  share = np.mean(np.concatenate(batches) >= 1000)
  assert abs(share - 0.25) < 0.02, share
  assert it.source_tokens == {"web": int(round(40 * 8 * 4 * (1 - share))), "code": int(round(40 * 8 * 4 * share))}
  resumed = make()
  early = make()
  for _ in range(25):
    next(early)
  resumed.restore(json.loads(json.dumps(early.state())))
  for j in range(25, 40):
    np.testing.assert_array_equal(next(resumed)["inputs"][..., 0].ravel(), batches[j])
  assert resumed.source_tokens == it.source_tokens


# ---------------------------------------------------------------------- bad input


def _cfg(*extra):
  return load_config("tiny-pretrain", ["train.progress=false", "data.batch_size=2", "data.seq_len=16", *extra])


def test_checksum_failure_names_the_shard(shards, tmp_path):
  import shutil
  bad = str(tmp_path / "bad")
  shutil.copytree(shards, bad)
  victim = os.path.join(bad, "train-00001.tokens")
  raw = bytearray(open(victim, "rb").read())
  raw[10] ^= 0xFF
  open(victim, "wb").write(bytes(raw))
  with pytest.raises(ValueError, match=r"shard .*train-00001\.tokens fails its checksum"):
    data_lib.build(_cfg(f"data.sources=[{{path: {bad}}}]"), TOK, None)


def test_tokenizer_mismatch_shows_both_fingerprints(corpus, tmp_path):
  out = str(tmp_path / "v3")
  data_lib.tokenize([corpus[0] / "a0.txt"], out, data_lib.TokenizeSpec(tokenizer=Tokenizer.load("v3").path,
                                                                       heldout_fraction=0), progress=False)
  theirs = data_lib.tokenizer_fingerprint(Tokenizer.load("v3").path)
  ours = data_lib.tokenizer_fingerprint(TOK.path)
  assert theirs != ours
  with pytest.raises(ValueError, match=f"tokenizer {theirs} .* this run uses {ours}"):
    data_lib.build(_cfg(f"data.paths=[{out}]"), TOK, None)


def test_bad_sources_are_named(tmp_path, shards):
  (tmp_path / "blank.txt").write_text("   \n\n")
  with pytest.raises(ValueError, match="hold no text .*empty source"):
    data_lib.tokenize([tmp_path / "blank.txt"], str(tmp_path / "o1"), spec(), progress=False)
  (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text field"}\n')
  with pytest.raises(ValueError, match=r"x\.jsonl:3: no string field 'text'"):
    data_lib.tokenize([tmp_path / "x.jsonl"], str(tmp_path / "o2"), spec(), progress=False)
  with pytest.raises(ValueError, match=r"mixture weight 0.0 must be > 0"):
    data_lib.build(_cfg(f"data.sources=[{{path: {shards}, weight: 1}}, {{path: {shards}, weight: 0, name: b}}]"),
                   TOK, None)
  rows = len(data_lib.TextRows(data_lib.ShardSet(shards, data_lib.load_manifest(shards), "train"), 256))
  with pytest.raises(ValueError, match=f"the data holds {rows} rows .* one batch needs data.batch_size=64"):
    data_lib.build(_cfg(f"data.paths=[{shards}]", "data.batch_size=64", "data.seq_len=256"), TOK, None)


def test_build_mixes_weighted_shard_sources(shards):
  """The run config's data.sources: two weighted shard directories, per-source tokens delivered."""
  cfg = _cfg(f"data.sources=[{{path: {shards}, weight: 3, name: a}}, {{path: {shards}, weight: 1, name: b}}]",
             "data.batch_size=8")
  it = data_lib.build(cfg, TOK, None).train
  for _ in range(4):
    batch = next(it)
  assert batch["inputs"].shape == (1, 8, 16)
  assert it.source_tokens == {"a": 3 * 4 * 2 * 16, "b": 4 * 2 * 16}


# ---------------------------------------------------------------------- kill and resume


@pytest.mark.subprocess_cli
def test_sigkill_mid_tokenize_leaves_complete_shards_and_rerun_finishes(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  docs = [text(1000 + i, 2500) for i in range(24)]
  for i, d in enumerate(docs):
    (src / f"f{i:02d}.txt").write_text(d)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "mixtral_jax.cli", "tokenize", str(src), "--out", str(out), "--workers", "1",
         "--shard-mb", "0.001", "--heldout-fraction", "0", "--no-progress"]
  child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 120
  while not glob.glob(str(out / "train-*.json")) and time.monotonic() < deadline and child.poll() is None:
    time.sleep(0.005)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert child.returncode == -signal.SIGKILL, "tokenize finished before it could be killed"
  assert not (out / "manifest.json").exists()
  done = sorted(glob.glob(str(out / "train-*.json")))
  assert 0 < len(done) < len(docs)
  for record_path in done:  # every shard that claims to be complete is complete
    verify_shard(str(out), json.load(open(record_path)))

  messages = []
  data_lib.tokenize([src], str(out), spec(shard_mb=0.001), progress=False, log=messages.append)
  assert f"{len(done)} of {len(docs)} shards already complete" in messages[0]
  np.testing.assert_array_equal(read_split(str(out)), reference_stream(docs))
  assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_chat_shards_keep_the_assistant_loss_mask(tmp_path):
  """Chat JSONL tokenized into shards: tokens and mask are assistant_spans' own, row by row."""
  convs = [[{"role": "user", "content": f"Count to {n}."},
            {"role": "assistant", "content": " ".join(map(str, range(n)))}] for n in (2, 5, 3)]
  (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
  out = str(tmp_path / "s")
  data_lib.tokenize([tmp_path / "c.jsonl"], out, spec(kind="chat"), progress=False)
  m = data_lib.load_manifest(out)
  assert m["kind"] == "chat" and m["splits"]["train"]["documents"] == 3
  want = [data_lib.assistant_spans(c, "v1") for c in convs]
  rows = data_lib.make_rows(data_lib.ShardSet(out, m, "train"), seq_len=64)
  assert len(rows) == 1  # all three packed into one row
  ref = data_lib.pack_conversations(want, 64, TOK.pad_id)
  for k in ref:
    np.testing.assert_array_equal(rows[0][k], ref[k], err_msg=k)
