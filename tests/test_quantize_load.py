"""Quantize-on-load (``from_pretrained(path, quantize="int8")``) against quantizing the loaded model: the
same bits on a Hugging Face, a Mistral consolidated and our Orbax checkpoint, alone and on a mesh; the
full-precision weights never all resident; and bad input refused with the loader's own messages."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from test_checkpoint_formats import write_consolidated

import mixtral_jax
from mixtral_jax.checkpoint import layout
from mixtral_jax.checkpoint.loading import our_shapes
from mixtral_jax.cli import main as cli
from mixtral_jax.inference.quantize import SCALE, SITE_AXES, quantize

SMALL = dict(num_hidden_layers=4, vocab_size=300)


@pytest.fixture(scope="module")
def checkpoints(hf_model, save_hf, tmp_path_factory):
  """The same random model as HF safetensors (fp32, per-expert keys, sharded), Mistral consolidated
  safetensors (bf16) and our Orbax format."""
  root = tmp_path_factory.mktemp("qload")
  hf = hf_model(seed=4, **SMALL)
  save_hf(hf, root / "hf", shard_size="200KB")
  write_consolidated(hf.to(torch.bfloat16), str(root / "consolidated"), "safetensors")
  assert cli(["convert", str(root / "hf"), str(root / "ours")]) == 0
  return root


def flat(model):
  return {k: v[...] for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = fa[k], fb[k]
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim) or k[-1].endswith(SCALE), k
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(k))


@pytest.mark.parametrize("fmt", ["hf", "consolidated", "ours"])
@pytest.mark.slow
def test_quantize_on_load_equals_quantize_after_load(checkpoints, fmt):
  streamed = mixtral_jax.from_pretrained(checkpoints / fmt, quantize="int8")
  assert flat(streamed)[("blocks", "moe", "w1_EDF")].dtype == np.int8
  assert_same(streamed, quantize(mixtral_jax.from_pretrained(checkpoints / fmt)))


@pytest.mark.slow
def test_quantize_on_load_on_a_mesh(checkpoints):
  """fsdp=2 splits the contracted D axis of q/k/v and w1/w3: the per-channel max spans devices."""
  mesh = "fsdp=2,expert=4"
  streamed = mixtral_jax.from_pretrained(checkpoints / "hf", mesh=mesh, quantize="int8")
  ref = quantize(mixtral_jax.from_pretrained(checkpoints / "hf", mesh=mesh))
  assert_same(streamed, ref)
  w1 = flat(streamed)[("blocks", "moe", "w1_EDF")]
  assert len(w1.sharding.device_set) == 8 and w1.addressable_shards[0].data.shape != w1.shape


def test_full_precision_weights_are_never_all_resident(checkpoints, monkeypatch):
  """Every time the loader reads a block, the float arrays on the devices (other than the weights
  that stay float: embedding, norms, router) are at most one layer of one matmul weight in flight,
  plus the int8 and scale buffers being filled."""
  baseline = jax.live_arrays()  # held, so their ids stay unique while the load runs
  seen = {id(a) for a in baseline}
  peaks = []
  real_read = layout.Plan.read

  def read(self, key, index, dtype):
    live = [a for a in jax.live_arrays() if id(a) not in seen and a.dtype == dtype]
    peaks.append(sum(a.nbytes for a in live))
    return real_read(self, key, index, dtype)

  monkeypatch.setattr(layout.Plan, "read", read)
  model = mixtral_jax.from_pretrained(checkpoints / "hf", quantize="int8")
  del baseline
  cfg = model.cfg
  shapes, _ = our_shapes(cfg)
  f32 = np.dtype(cfg.param_dtype).itemsize
  kept = sum(np.prod(s) for k, s in shapes.items() if k not in SITE_AXES) * f32
  quantized = sum(np.prod(s) for k, s in shapes.items() if k in SITE_AXES) * f32
  one_layer = max(np.prod(s[1:]) if k[0] == "blocks" else np.prod(s) for k, s in shapes.items()
                  if k in SITE_AXES) * f32
  assert max(peaks) <= kept + one_layer, (max(peaks), kept, one_layer)
  assert kept + one_layer < 0.4 * (kept + quantized)  # so the bound above says something


def edit(directory, fn):
  path = next(directory.glob("consolidated*.safetensors"))
  tensors = load_file(str(path))
  fn(tensors)
  save_file(tensors, str(path))


@pytest.mark.parametrize("case", ["missing", "misshaped"])
def test_bad_input_gives_the_loaders_errors(checkpoints, tmp_path, case):
  import shutil

  src = tmp_path / "src"
  shutil.copytree(checkpoints / "consolidated", src)
  name = "layers.1.feed_forward.experts.3.w2.weight"
  if case == "missing":
    edit(src, lambda t: t.pop(name))
  else:
    edit(src, lambda t: t.__setitem__(name, t[name][:, :-1].clone()))
  with pytest.raises(ValueError) as plain:
    mixtral_jax.from_pretrained(src)
  with pytest.raises(ValueError) as quantized:
    mixtral_jax.from_pretrained(src, quantize="int8")
  assert str(quantized.value) == str(plain.value) and name in str(plain.value)
  with pytest.raises(ValueError, match="unknown quantization 'int4'; supported: int8"):
    mixtral_jax.from_pretrained(checkpoints / "hf", quantize="int4")


@pytest.mark.slow
def test_cli_generate_quantize_reads_int8(hf_model, save_hf, tmp_path, capsys, monkeypatch):
  """``generate --quantize int8`` loads through quantize-on-load and prints what the API gives for
  the model quantized after loading."""
  from mixtral_jax.checkpoint import loading

  path = save_hf(hf_model(seed=3, num_hidden_layers=1, vocab_size=32000), tmp_path / "hf")  # v1's vocabulary
  streamed = []
  real = loading._create_quantized
  monkeypatch.setattr(loading, "_create_quantized", lambda *a, **k: streamed.append(1) or real(*a, **k))
  rc = cli(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "1", "--temperature", "0",
            "--quantize", "int8", "--no-echo"])
  out = capsys.readouterr()
  want = mixtral_jax.generate(quantize(mixtral_jax.from_pretrained(path)), ["Hello"], 1, tokenizer="v1")
  assert rc == 0 and len(streamed) == len(SITE_AXES)
  assert out.out == want.texts[0] + "\n"


def test_adapter_merged_before_quantizing(hf_model, checkpoints, tmp_path):
  """A weight a LoRA adapter changes is merged, then quantized: the same bits as quantizing the merged
  model (attention, fused experts, router, LM head)."""
  import peft

  lc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"],
                       target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj"])
  pm = peft.get_peft_model(hf_model(seed=4, **SMALL), lc)
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.05)
  pm.save_pretrained(str(tmp_path / "adapter"))
  kw = dict(adapter=tmp_path / "adapter")
  merged = mixtral_jax.from_pretrained(checkpoints / "hf", **kw)
  base = mixtral_jax.from_pretrained(checkpoints / "hf")
  assert not np.array_equal(flat(merged)[("head_DV",)], flat(base)[("head_DV",)])
  assert_same(mixtral_jax.from_pretrained(checkpoints / "hf", quantize="int8", **kw), quantize(merged))
