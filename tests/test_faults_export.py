"""``export``'s staging (issue 23, item 3): the checkpoint is verified before anything is written (a weight
changed in place is named, nothing lands at the destination), a destination inside the checkpoint is
refused, and temporaries of dead exports are removed while a live one's is left. References: the
bytes of the checkpoint's own arrays (the export of the untouched checkpoint loads them back equal)."""

import os

import numpy as np
import pytest
import tensorstore as ts

import mixtral_jax
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint import integrity, staging
from mixtral_jax.cli import main as cli


@pytest.fixture
def ckpt(tmp_path):
  cfg = mixtral_jax.get_config("tiny", num_hidden_layers=2, vocab_size=300, hidden_size=32, intermediate_size=64,
                               num_attention_heads=4, num_key_value_heads=2)
  return checkpoint.save(mixtral_jax.create_model(cfg, seed=2), tmp_path / "orbax")


def test_changed_weight_is_named_and_nothing_is_exported(ckpt, tmp_path):
  params = os.path.join(ckpt, "params")
  w = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{params}/",
                                             "path": "blocks.moe.w2_EFD"}}, open=True).result()
  w[1, 0, 0, 0].write(np.float32(3.25)).result()  # decodes fine: only the digest can tell
  with pytest.raises(integrity.ChecksumError, match=r"blocks\.moe\.w2_EFD \(layer 1\) fails its checksum"):
    checkpoint.export(ckpt, tmp_path / "hf")
  assert sorted(os.listdir(tmp_path)) == ["orbax"]  # no destination, no temporary


def test_destination_inside_the_checkpoint_is_refused(ckpt, capsys):
  before = sorted(os.listdir(ckpt))
  for dst in (ckpt, os.path.join(ckpt, "hf")):
    assert cli(["export", str(ckpt), str(dst), "--overwrite"]) == 2
    assert "is the source" in capsys.readouterr().err
  assert sorted(os.listdir(ckpt)) == before


def test_dead_exports_temporaries_are_removed_and_a_live_one_is_kept(ckpt, tmp_path):
  dead, live = tmp_path / ".hf.tmp-dead", tmp_path / ".hf.tmp-live"
  for d in (dead, live):
    d.mkdir()
  (dead / staging.OWNER).write_text("12345\n")  # its writer was killed: nobody holds the lock
  (dead / "model.safetensors").write_bytes(b"\0" * 1024)
  with staging.owned(str(live)):
    checkpoint.export(ckpt, tmp_path / "hf")
    assert live.exists() and not dead.exists()
  assert sorted(os.listdir(tmp_path)) == [".hf.tmp-live", "hf", "orbax"]
  assert not os.path.exists(tmp_path / "hf" / staging.OWNER)
  back = mixtral_jax.from_pretrained(tmp_path / "hf")
  orig = mixtral_jax.from_pretrained(ckpt)
  np.testing.assert_array_equal(np.asarray(back.blocks.moe.w2_EFD[...]), np.asarray(orig.blocks.moe.w2_EFD[...]))
