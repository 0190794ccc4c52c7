"""Bad input: each case names its cause, and a failed convert/export leaves nothing at DST (nor a
temporary sibling)."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mixtral_jax
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint import orbax_io
from mixtral_jax.cli import main as cli

SMALL = dict(num_hidden_layers=2, vocab_size=300)


@pytest.fixture(scope="module")
def pristine(hf_model, save_hf, tmp_path_factory):
  root = tmp_path_factory.mktemp("pristine")
  hf = hf_model(seed=2, **SMALL)
  save_hf(hf, root / "single")
  save_hf(hf, root / "sharded", shard_size="100KB")
  return root


@pytest.fixture
def src(pristine, tmp_path):
  shutil.copytree(pristine / "single", tmp_path / "src")
  return tmp_path / "src"


def edit_tensors(directory, fn):
  path = directory / "model.safetensors"
  tensors = load_file(str(path))
  fn(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(directory, **changes):
  cfg = json.loads((directory / "config.json").read_text())
  cfg.update(changes)
  (directory / "config.json").write_text(json.dumps(cfg))


def assert_refused(src, capsys, *fragments, dst_name="dst"):
  """convert fails with every fragment in its one-line message; DST and temporaries are absent; and
  from_pretrained refuses the same input with the same cause."""
  dst = src.parent / dst_name
  assert cli(["convert", str(src), str(dst)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("mixtral-jax convert: error:") and err.count("\n") == 1, err
  for fragment in fragments:
    assert fragment in err, (fragment, err)
  assert not dst.exists()
  assert not [p for p in os.listdir(src.parent) if p.startswith(f".{dst_name}.")]
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    mixtral_jax.from_pretrained(src)
  assert all(f in str(info.value) for f in fragments)


def test_missing_tensor(src, capsys):
  name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
  edit_tensors(src, lambda t: t.pop(name))
  assert_refused(src, capsys, "missing tensor", name)


def test_unexpected_tensor(src, capsys):
  name = "model.layers.0.block_sparse_moe.experts.0.w4.weight"
  edit_tensors(src, lambda t: t.update({name: np.zeros((4, 4), np.float32)}))
  assert_refused(src, capsys, "unexpected tensor", name)


def test_wrong_shape_names_tensor_and_both_shapes(src, capsys):
  name = "model.layers.1.self_attn.k_proj.weight"
  edit_tensors(src, lambda t: t.update({name: np.zeros((16, 64), np.float32)}))
  assert_refused(src, capsys, name, "[16, 64]", "expected [32, 64]", "num_key_value_heads*head_dim=32")


def test_config_that_disagrees_with_tensors_names_field_and_tensor(src, capsys):
  edit_config(src, vocab_size=301)
  assert_refused(src, capsys, "tensor 'lm_head.weight' has shape [300, 64], expected [301, 64]",
                 "vocab_size=301 but the tensor says 300")


def test_config_with_fewer_layers_than_the_tensors(src, capsys):
  edit_config(src, num_hidden_layers=1)
  assert_refused(src, capsys, "unexpected tensor", "model.layers.1.", "num_hidden_layers=1")


def test_truncated_file(src, capsys):
  path = src / "model.safetensors"
  os.truncate(path, os.path.getsize(path) - 100)
  assert_refused(src, capsys, "truncated", "model.safetensors")


def test_corrupt_header_length(src, capsys):
  path = src / "model.safetensors"
  with open(path, "r+b") as f:
    f.write((2**40).to_bytes(8, "little"))
  assert_refused(src, capsys, "header length 1099511627776", "model.safetensors")


def test_missing_shard(pristine, tmp_path, capsys):
  shutil.copytree(pristine / "sharded", tmp_path / "src")
  second = sorted(p for p in os.listdir(tmp_path / "src") if p.startswith("model-"))[1]
  os.remove(tmp_path / "src" / second)
  assert_refused(tmp_path / "src", capsys, second, "incomplete")


def test_unknown_format(tmp_path, capsys):
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "weights.bin").write_bytes(b"\0" * 16)
  (tmp_path / "src" / "notes.txt").write_text("hi")
  assert_refused(tmp_path / "src", capsys, "unknown checkpoint format", "notes.txt, weights.bin",
                 "params.json")


def test_pth_that_would_run_code_is_refused(tmp_path, capsys):
  import torch

  (tmp_path / "src").mkdir()
  params = {"dim": 64, "n_layers": 1, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5,
            "vocab_size": 300, "moe": {"num_experts": 8, "num_experts_per_tok": 2}}
  (tmp_path / "src" / "params.json").write_text(json.dumps(params))
  torch.save({"tok_embeddings.weight": torch.zeros(2), "hook": Exploit()}, tmp_path / "src" / "consolidated.00.pth")
  assert_refused(tmp_path / "src", capsys, "weights_only=True")
  assert not Exploit.ran


class Exploit:
  ran = False

  def __reduce__(self):
    return (Exploit._run, ())

  @staticmethod
  def _run():
    Exploit.ran = True


def test_existing_dst_is_refused_unless_overwrite(src, capsys):
  dst = src.parent / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  assert cli(["convert", str(src), str(dst)]) == 2
  assert "already exists" in capsys.readouterr().err and (dst / "keep.txt").read_text() == "mine"
  assert cli(["convert", str(src), str(dst), "--overwrite"]) == 0
  assert sorted(os.listdir(dst)) == ["config.json", "params", "params.digests.json"]
  assert cli(["export", str(dst), str(dst)]) == 2
  assert "already exists" in capsys.readouterr().err


def test_failure_while_writing_leaves_nothing(src, monkeypatch):
  calls = []

  def fail_on_fifth(self, key, index, value):
    calls.append(key)
    if len(calls) == 5:
      raise OSError("disk full (simulated)")

  monkeypatch.setattr(orbax_io.StreamingWriter, "write", fail_on_fifth)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.convert(src, src.parent / "dst")
  assert len(calls) == 5 and sorted(os.listdir(src.parent)) == ["src"]


def test_orbax_checkpoint_that_disagrees_with_its_config(src, tmp_path, capsys):
  checkpoint.convert(src, tmp_path / "ours")
  edit_config(tmp_path / "ours", intermediate_size=96)
  with pytest.raises(ValueError, match=r"'blocks.moe.w1_EDF' has shape \[2, 8, 64, 128\], expected \[2, 8, 64, 96\]"):
    mixtral_jax.from_pretrained(tmp_path / "ours")
  assert cli(["export", str(tmp_path / "ours"), str(tmp_path / "out")]) == 2
  assert "blocks.moe.w1_EDF" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_export_needs_an_orbax_checkpoint(src, capsys):
  assert cli(["export", str(src), str(src.parent / "out")]) == 2
  assert "convert it first" in capsys.readouterr().err
