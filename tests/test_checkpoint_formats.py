"""Every source format against transformers, our Orbax format against its source, export back to
transformers, training-run directories, and sharded loading against a single device."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from reference import TINY, VARIANTS

import mixtral_jax
from mixtral_jax import checkpoint
from mixtral_jax.cli import main as cli

pytestmark = pytest.mark.slow

IDS = np.random.default_rng(1).integers(0, TINY["vocab_size"], (8, 7)).astype(np.int32)
forward = nnx.jit(lambda model, ids: model(ids))


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def params_of(model):
  return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ------------------------------------------------------------------------- Mistral consolidated

def write_consolidated(hf, directory, kind):
  """Mistral's layout built from a transformers model with the documented key mapping; q/k rows go back
  from half-split to interleaved rotary pairs (the inverse of transformers' conversion permutation)."""
  import torch
  from safetensors.torch import save_file

  c = hf.config
  N, K, D, F, L, E = (c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size,
                      c.num_hidden_layers, c.num_local_experts)
  H = c.head_dim or D // N
  sd = hf.state_dict()

  def interleave(w, heads):  # [heads*H, D]: rows (half s, index i) -> (index i, half s)
    return w.reshape(heads, 2, H // 2, D).transpose(1, 2).reshape(heads * H, D)

  out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
         "output.weight": sd["lm_head.weight"]}
  for l in range(L):
    hp, mp = f"model.layers.{l}.", f"layers.{l}."
    out[mp + "attention.wq.weight"] = interleave(sd[hp + "self_attn.q_proj.weight"], N)
    out[mp + "attention.wk.weight"] = interleave(sd[hp + "self_attn.k_proj.weight"], K)
    out[mp + "attention.wv.weight"] = sd[hp + "self_attn.v_proj.weight"]
    out[mp + "attention.wo.weight"] = sd[hp + "self_attn.o_proj.weight"]
    out[mp + "attention_norm.weight"] = sd[hp + "input_layernorm.weight"]
    out[mp + "ffn_norm.weight"] = sd[hp + "post_attention_layernorm.weight"]
    out[mp + "feed_forward.gate.weight"] = sd[hp + "mlp.gate.weight"]
    gate_up, down = sd[hp + "mlp.experts.gate_up_proj"], sd[hp + "mlp.experts.down_proj"]  # [E,2F,D], [E,D,F]
    for e in range(E):
      out[mp + f"feed_forward.experts.{e}.w1.weight"] = gate_up[e, :F]
      out[mp + f"feed_forward.experts.{e}.w3.weight"] = gate_up[e, F:]
      out[mp + f"feed_forward.experts.{e}.w2.weight"] = down[e]
  out = {k: v.detach().clone().contiguous() for k, v in out.items()}
  os.makedirs(directory)
  params = {"dim": D, "n_layers": L, "head_dim": H, "hidden_dim": F, "n_heads": N, "n_kv_heads": K,
            "norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
            "moe": {"num_experts": E, "num_experts_per_tok": c.num_experts_per_tok}}  # no rope_theta: 1e6
  with open(os.path.join(directory, "params.json"), "w") as f:
    json.dump(params, f)
  if kind == "pth":
    torch.save(out, os.path.join(directory, "consolidated.00.pth"))
  else:
    save_file(out, os.path.join(directory, "consolidated.safetensors"))
  return directory


@pytest.fixture(scope="module", params=["gqa2", "head_dim32"])
def source(hf_logits, hf_model, request, tmp_path_factory):
  hf = hf_model(seed=11, **VARIANTS[request.param])
  root = tmp_path_factory.mktemp(request.param)
  return hf, hf_logits(hf, IDS)[0], root


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_consolidated_parity(source, kind):
  hf, ref, root = source
  path = write_consolidated(hf, str(root / kind), kind)
  model = mixtral_jax.from_pretrained(path)
  assert model.cfg.rope_theta == 1e6
  assert rel_err(forward(model, IDS), ref) <= 1e-4


def test_params_json_rope_theta(tmp_path):
  params = {"dim": 64, "n_layers": 2, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5,
            "vocab_size": 1000, "moe": {"num_experts": 8, "num_experts_per_tok": 2}}
  (tmp_path / "params.json").write_text(json.dumps(params))
  assert checkpoint.load_config(tmp_path).rope_theta == 1e6
  (tmp_path / "params.json").write_text(json.dumps({**params, "rope_theta": 1e4}))
  assert checkpoint.load_config(tmp_path).rope_theta == 1e4


# ------------------------------------------------------------------------- our Orbax format

@pytest.fixture(scope="module")
def converted(hf_model, save_hf, tmp_path_factory):
  root = tmp_path_factory.mktemp("orbax")
  hf = hf_model(seed=5)
  save_hf(hf, root / "hf", shard_size="150KB")
  (root / "hf" / "tokenizer.model").write_bytes(b"placeholder tokenizer")
  assert cli(["convert", str(root / "hf"), str(root / "ours")]) == 0
  return hf, root


def test_converted_equals_source_and_transformers(hf_logits, converted):
  hf, root = converted
  ours, src = mixtral_jax.from_pretrained(root / "ours"), mixtral_jax.from_pretrained(root / "hf")
  a, b = params_of(ours), params_of(src)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert rel_err(forward(ours, IDS), hf_logits(hf, IDS)[0]) <= 1e-4
  assert checkpoint.find_tokenizer(root / "ours") == str(root / "ours" / "tokenizer.model")


def test_find_tokenizer_in_mistral_layout(tmp_path):
  """Mistral's consolidated releases name the file tokenizer.model.v1 / .v3; two of them are ambiguous."""
  assert checkpoint.find_tokenizer(tmp_path) is None
  (tmp_path / "tokenizer.model.v3").write_bytes(b"x")
  assert checkpoint.find_tokenizer(tmp_path) == str(tmp_path / "tokenizer.model.v3")
  (tmp_path / "tokenizer.model.v1").write_bytes(b"x")
  assert checkpoint.find_tokenizer(tmp_path) is None
  (tmp_path / "tokenizer.model").write_bytes(b"x")
  assert checkpoint.find_tokenizer(tmp_path) == str(tmp_path / "tokenizer.model")


def test_streamed_checkpoint_is_plain_orbax(converted):
  """Orbax's own restore, with no target and none of our code, reads what the streaming writer wrote."""
  _, root = converted
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(str(root / "ours" / "params"))
  flat = {".".join(k): np.asarray(v) for k, v in checkpoint.orbax_io.flatten(restored).items()}
  expected = params_of(mixtral_jax.from_pretrained(root / "hf"))
  assert flat.keys() == expected.keys() and all(np.array_equal(flat[k], expected[k]) for k in flat)


def test_save_then_load_equals_source(converted, tmp_path):
  _, root = converted
  model = mixtral_jax.from_pretrained(root / "hf")
  checkpoint.save(model, tmp_path / "saved")
  loaded = mixtral_jax.from_pretrained(tmp_path / "saved")
  a, b = params_of(model), params_of(loaded)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  np.testing.assert_array_equal(np.asarray(forward(loaded, IDS)), np.asarray(forward(model, IDS)))


def test_convert_to_bf16(converted, tmp_path):
  _, root = converted
  checkpoint.convert(root / "hf", tmp_path / "bf16", param_dtype="bfloat16")
  model = mixtral_jax.from_pretrained(tmp_path / "bf16")
  assert model.cfg.param_dtype == "bfloat16" and model.head_DV[...].dtype == np.dtype("bfloat16")
  src = params_of(mixtral_jax.from_pretrained(root / "hf"))["blocks.moe.w2_EFD"]
  np.testing.assert_array_equal(params_of(model)["blocks.moe.w2_EFD"], src.astype("bfloat16"))


def test_export_round_trip_through_transformers(hf_logits, converted, tmp_path):
  import transformers

  _, root = converted
  assert cli(["export", str(root / "ours"), str(tmp_path / "out"), "--max-shard-size", "200KB"]) == 0
  files = sorted(os.listdir(tmp_path / "out"))
  assert "model.safetensors.index.json" in files and sum(f.startswith("model-") for f in files) > 1
  assert "tokenizer.model" in files
  theirs = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  ours = forward(mixtral_jax.from_pretrained(root / "ours"), IDS)
  assert np.abs(hf_logits(theirs, IDS)[0] - np.asarray(ours)).max() <= 1e-5


def test_training_run_layout(converted, tmp_path):
  """A run directory as the trainer writes it: WORKDIR/config.json and an Orbax CheckpointManager with
  the parameters as item 'params' in WORKDIR/checkpoints/STEP."""
  _, root = converted
  base = mixtral_jax.from_pretrained(root / "ours")
  params = nnx.state(base, nnx.Param).to_pure_dict()
  work = tmp_path / "run"
  with ocp.CheckpointManager(str(work / "checkpoints")) as mgr:
    for step, scale in ((3, 1.0), (7, 2.0)):
      tree = jax.tree.map(lambda a, s=scale: a * s, params)
      mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
  base.cfg.save(work / "config.json")
  latest = params_of(mixtral_jax.from_pretrained(work))
  step3 = params_of(mixtral_jax.from_pretrained(work / "checkpoints" / "3"))
  src = params_of(base)
  assert all(np.array_equal(latest[k], 2 * src[k]) and np.array_equal(step3[k], src[k]) for k in src)
  checkpoint.export(work, tmp_path / "hf")
  again = params_of(mixtral_jax.from_pretrained(tmp_path / "hf"))
  assert all(np.array_equal(again[k], latest[k]) for k in src)


@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2", "data=2,expert=4"])
def test_sharded_load_matches_one_device(converted, mesh):
  from mixtral_jax.params import param_shardings

  _, root = converted
  single = np.asarray(forward(mixtral_jax.from_pretrained(root / "hf"), IDS))
  for src in ("hf", "ours"):
    model = mixtral_jax.from_pretrained(root / src, mesh=mesh)
    mesh_obj = model.embed_VD[...].sharding.mesh
    want = param_shardings(nnx.state(model, nnx.Param), mesh_obj)
    for (path, var), (_, spec) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(want)):
      assert var[...].sharding.is_equivalent_to(spec.get_value(), var[...].ndim), path
    with jax.set_mesh(mesh_obj):
      sharded = np.asarray(forward(model, IDS))
    assert np.abs(sharded - single).max() <= 1e-5 * np.abs(single).max()


def test_demo_round_trip(tmp_path, capsys):
  assert cli(["demo", "--format", "hf", "--out", str(tmp_path / "demo")]) == 0
  out = capsys.readouterr().out
  assert "shape [1, 8, 32000] float32" in out and "identical to the in-memory model: True" in out
  assert checkpoint.detect(tmp_path / "demo").kind == "hf"
