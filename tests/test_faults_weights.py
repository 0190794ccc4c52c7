"""Faults in weights on the way in (issue 23, items 1-2): NaN/Inf in any tensor is an error naming the tensor
and the count (convert, from_pretrained of every format, quantize-on-load), unless allowed; a flipped byte
in an Orbax checkpoint's data is an error naming the array and the checkpoint; old checkpoints without
digests still load. References: the values written (NumPy), and the model saved before the damage."""

import glob
import json
import os
import shutil
import zlib

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import xxhash
from safetensors.numpy import load_file, save_file

import mixtral_jax
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint import integrity
from mixtral_jax.cli import main as cli

SMALL = dict(num_hidden_layers=2, vocab_size=300, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2)
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A tiny model as our Orbax checkpoint and as a Hugging Face directory (exported from it)."""
  root = tmp_path_factory.mktemp("pristine")
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", **SMALL), seed=3)
  checkpoint.save(model, root / "orbax")
  checkpoint.export(root / "orbax", root / "hf")
  return root


def poison(directory, name=Q_PROJ, values=(np.nan, np.inf, -np.inf)):
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  flat = tensors[name].reshape(-1)
  flat[:len(values)] = values
  save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def bad_hf(pristine, tmp_path):
  shutil.copytree(pristine / "hf", tmp_path / "hf")
  poison(tmp_path / "hf")
  return tmp_path / "hf"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_count_nonfinite_matches_numpy(dtype):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(1000).astype(dtype)
  x[rng.choice(1000, 37, replace=False)] = rng.choice([np.nan, np.inf, -np.inf], 37)
  x[:3] = np.array([np.finfo(np.float16).max, 0, -0.0]).astype(dtype)  # large finite values are fine
  assert integrity.count_nonfinite(x) == int((~np.isfinite(x.astype(np.float64))).sum()) == 37


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_device_check_flags_each_kind_alone_and_counts_exactly(dtype, bad):
  """One kind of bad value at a time (a NaN alone must not hide behind max's ordering), in one of three
  layer slices; the count comes from the host re-read and equals NumPy's."""
  import jax  # noqa: PLC0415
  rng = np.random.default_rng(1)
  layers = [rng.standard_normal((16, 24)).astype(dtype) for _ in range(3)]
  layers[1].reshape(-1)[rng.choice(16 * 24, 5, replace=False)] = bad
  check = integrity.DeviceFiniteCheck("CKPT")
  for i, layer in enumerate(layers):
    check.add("blocks.w", jax.device_put(layer), lambda i=i: layers[i])
  check.add("head", jax.device_put(np.ones((4, 4), dtype)), lambda: pytest.fail("a finite slice is not re-read"))
  want = int((~np.isfinite(np.stack(layers).astype(np.float64))).sum())
  with pytest.raises(integrity.NonFiniteError, match=rf"CKPT: tensor blocks\.w holds {want} NaN/Inf value\(s\) out of "
                                                     rf"{3 * 16 * 24}"):
    check.finish()


@pytest.mark.slow
def test_convert_refuses_nonfinite_naming_tensor_and_count(bad_hf, tmp_path, capsys):
  rc = cli(["convert", str(bad_hf), str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert rc == 2 and "blocks.attn.q_DNH holds 3 NaN/Inf value(s)" in err and "--allow-nonfinite" in err
  assert err.count("\n") == 1 and not os.path.exists(tmp_path / "out")
  assert not glob.glob(str(tmp_path / ".out.tmp-*"))
  assert cli(["convert", str(bad_hf), str(tmp_path / "out"), "--allow-nonfinite"]) == 0
  assert mixtral_jax.from_pretrained(tmp_path / "out", allow_nonfinite=True) is not None


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_from_pretrained_hf_refuses_nonfinite(bad_hf, quantize):
  with pytest.raises(integrity.NonFiniteError, match=r"blocks\.attn\.q_DNH holds 3 NaN/Inf value\(s\) out of"):
    mixtral_jax.from_pretrained(bad_hf, quantize=quantize)
  model = mixtral_jax.from_pretrained(bad_hf, quantize=quantize, allow_nonfinite=True)
  assert model is not None


def test_from_pretrained_orbax_refuses_nonfinite(bad_hf, tmp_path):
  checkpoint.convert(bad_hf, tmp_path / "ckpt", allow_nonfinite=True)
  for quantize in (None, "int8"):
    with pytest.raises(integrity.NonFiniteError, match=r"q_DNH holds 3 NaN/Inf"):
      mixtral_jax.from_pretrained(tmp_path / "ckpt", quantize=quantize)


def test_converted_and_saved_checkpoints_carry_digests_that_match(pristine, tmp_path):
  checkpoint.convert(pristine / "hf", tmp_path / "ckpt")
  for ckpt in (pristine / "orbax", tmp_path / "ckpt"):
    assert os.path.isfile(ckpt / integrity.DIGEST_FILE)
    assert integrity.verify(str(ckpt / "params")) is True
  # the same bytes give the same digests whichever way they were written (streamed or Orbax's own save)
  a = json.load(open(pristine / "orbax" / integrity.DIGEST_FILE))["arrays"]
  b = json.load(open(tmp_path / "ckpt" / integrity.DIGEST_FILE))["arrays"]
  assert a == b


def _stored(params_dir, name):
  """The array ``name`` as TensorStore reads it from the checkpoint (not through our reader)."""
  spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{params_dir}/", "path": name}}
  return np.asarray(ts.open(spec, open=True).result().read().result())


def test_recorded_digests_are_xxh3_of_the_stored_bytes(pristine):
  """Reference: the xxhash library over each layer's C-order bytes, read by TensorStore directly."""
  params = str(pristine / "orbax" / "params")
  arrays = json.load(open(pristine / "orbax" / integrity.DIGEST_FILE))["arrays"]
  for name in ("blocks.moe.w2_EFD", "embed_VD"):
    value = _stored(params, name)
    layers = list(value) if name.startswith("blocks.") else [value]
    assert arrays[name]["xxh3_64"] == [xxhash.xxh3_64_intdigest(np.ascontiguousarray(v).tobytes()) for v in layers]


def test_a_checkpoint_with_the_older_crc32_file_is_still_verified(pristine, tmp_path):
  """Checkpoints of the previous release carry ``params.crc32.json``: it is read and enforced."""
  shutil.copytree(pristine / "orbax", tmp_path / "old")
  params = str(tmp_path / "old" / "params")
  arrays = json.load(open(tmp_path / "old" / integrity.DIGEST_FILE))["arrays"]
  for name, entry in arrays.items():
    value = _stored(params, name)
    layers = list(value) if len(entry.pop("xxh3_64")) > 1 else [value]
    entry["crc32"] = [zlib.crc32(np.ascontiguousarray(v).tobytes()) for v in layers]
  os.remove(tmp_path / "old" / integrity.DIGEST_FILE)
  with open(tmp_path / "old" / "params.crc32.json", "w") as f:
    json.dump({"algorithm": "crc32", "arrays": arrays}, f)
  assert integrity.verify(params) is True
  arrays["blocks.moe.w2_EFD"]["crc32"][1] ^= 1  # the recorded value no longer matches the data
  with open(tmp_path / "old" / "params.crc32.json", "w") as f:
    json.dump({"algorithm": "crc32", "arrays": arrays}, f)
  with pytest.raises(integrity.ChecksumError, match=r"blocks\.moe\.w2_EFD \(layer 1\) fails its checksum \(crc32\)"):
    mixtral_jax.from_pretrained(tmp_path / "old")


def _flip_bytes(params_dir):
  """Flips one byte in the middle of every OCDBT data file (the arrays' chunks live there)."""
  files = [f for f in glob.glob(os.path.join(params_dir, "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      data[len(data) // 2] ^= 0x01
      f.seek(0)
      f.write(data)


def test_flipped_byte_is_an_error_naming_array_and_checkpoint(pristine, tmp_path, capsys):
  shutil.copytree(pristine / "orbax", tmp_path / "ckpt")
  _flip_bytes(tmp_path / "ckpt" / "params")
  with pytest.raises(ValueError, match=rf"{tmp_path / 'ckpt'}.*(array \S+|corrupt)"):
    mixtral_jax.from_pretrained(tmp_path / "ckpt")
  assert cli(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "x", "--max-new-tokens", "1"]) != 0


def test_single_flipped_value_fails_its_crc(pristine, tmp_path):
  """A change that still decodes (the case zstd cannot see): one weight rewritten in place."""
  shutil.copytree(pristine / "orbax", tmp_path / "ckpt")
  params = str(tmp_path / "ckpt" / "params")
  w2 = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{params}/",
                                              "path": "blocks.moe.w2_EFD"}}, open=True).result()
  w2[1, 3, 5, 7].write(np.asarray(w2[1, 3, 5, 7].read().result()) + 1).result()
  with pytest.raises(integrity.ChecksumError, match=r"array blocks\.moe\.w2_EFD \(layer 1\) fails its checksum"):
    mixtral_jax.from_pretrained(tmp_path / "ckpt")


def test_checkpoint_without_digests_loads_with_a_note(pristine, tmp_path, caplog):
  shutil.copytree(pristine / "orbax", tmp_path / "old")
  os.remove(tmp_path / "old" / integrity.DIGEST_FILE)
  with caplog.at_level("WARNING"):
    model = mixtral_jax.from_pretrained(tmp_path / "old")
  assert "no params.digests.json" in caplog.text and model is not None
