"""LoRA training end to end through the CLI with the shipped lora-sft config, on a converted tiny base:
the base stays bit for bit, the loss falls on chat data, checkpoints hold the adapters only and record
the base, a resumed run repeats the straight run's losses exactly, another base is refused before
compiling (all with adapter dropout), and the run exports merged (transformers == our unmerged forward) and as a PEFT adapter
(peft on the HF base == ours)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
import mixtral_jax.checkpoint
from mixtral_jax.checkpoint import orbax_io
from mixtral_jax.cli import main as cli
from mixtral_jax.lora import merge as lora_merge
from mixtral_jax.lora import run as lora_run
from mixtral_jax.train import loop
from mixtral_jax.train import step as step_lib
from mixtral_jax.train.config import load_config
from mixtral_jax.sharding.mesh import make_mesh
from test_train_e2e import RUN, chat_lines, metrics
from test_train_loop import compilation_cache

pytestmark = pytest.mark.slow

STEPS = 4
DROPOUT = 0.1  # PEFT dropout on the adapters' inputs: the resumed run must draw the same masks


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
  with compilation_cache(tmp_path_factory.mktemp("jax_cache")):
    yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny"), seed=7)
  return str(mixtral_jax.checkpoint.save(model, tmp_path_factory.mktemp("base") / "tiny"))


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "chats.jsonl"
  path.write_text("\n".join(chat_lines()) + "\n")
  return str(path)


def lora_train(workdir, base, chats, steps, *extra) -> int:
  return cli(["train", "--config", "lora-sft", "--workdir", str(workdir), "--checkpoint", str(base),
              "--set", f"data.paths=[{chats}]", *RUN, "--steps", str(steps), "--batch-size", "8", "--seq-len", "64",
              "--lr", "1e-2", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=0", "--set", f"lora.dropout={DROPOUT}",
              *extra])


@pytest.fixture(scope="module")
def straight(base, chats, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  assert lora_train(workdir, base, chats, STEPS) == 0
  return str(workdir)


def test_loss_falls_and_checkpoints_hold_adapters_and_record_the_base(straight, base):
  m = metrics(straight)
  assert sorted(m) == list(range(1, STEPS + 1))
  assert m[STEPS]["loss"] < m[1]["loss"] - 0.5, [m[s]["loss"] for s in sorted(m)]
  params = orbax_io.stored_shapes(os.path.join(straight, "checkpoints", str(STEPS), "params"))
  assert params and all("lora" in "/".join(k) for k in params), sorted(params)[:4]
  rec = lora_run.read(straight)
  assert rec["base"]["checkpoint"] == os.path.abspath(base)
  assert rec["base"]["fingerprint"] == mixtral_jax.lora.fingerprint(mixtral_jax.checkpoint.load_config(base))


def test_resume_is_exact(straight, base, chats, tmp_path):
  assert lora_train(tmp_path, base, chats, STEPS // 2) == 0
  assert lora_train(tmp_path, base, chats, STEPS) == 0  # resumes from step 2, base reloaded
  want, got = metrics(straight), metrics(tmp_path)
  for s in range(STEPS // 2 + 1, STEPS + 1):
    assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])


def test_another_base_is_refused_before_compiling(straight, chats, tmp_path, capsys):
  other_cfg = mixtral_jax.get_config("tiny", intermediate_size=192)
  other = mixtral_jax.checkpoint.save(mixtral_jax.create_model(other_cfg), tmp_path / "other")
  assert lora_train(straight, other, chats, STEPS + 2) == 2
  err = capsys.readouterr().err
  assert "fingerprint" in err and "intermediate_size 256 != 192" in err, err
  assert cli(["export", straight, str(tmp_path / "m"), "--merge", "--base", str(other)]) == 2
  assert "intermediate_size 256 != 192" in capsys.readouterr().err
  with pytest.raises(ValueError, match="LoRA training run"):
    mixtral_jax.from_pretrained(straight)


def test_base_is_bit_identical_after_lora_steps(base, chats):
  """The step itself, the very program the runs above compiled (so it comes from the compilation
  cache): the frozen base comes back bit for bit and in the compute dtype, every adapter moves."""
  tc = load_config("lora-sft", [f"model.checkpoint={base}", f"data.paths=[{chats}]", "train.peak_flops=1e11",
                                "train.progress=false", "optimizer.warmup_steps=1", f"train.steps={STEPS}",
                                "data.batch_size=8", "data.seq_len=64", "optimizer.lr=1e-2",
                                "train.checkpoint_every=2", "train.eval_every=0", f"lora.dropout={DROPOUT}"])
  mcfg = loop.model_config(tc)
  mesh = make_mesh(None, num_experts=mcfg.num_local_experts)
  fn, _, abstract_batch = step_lib.build_train_step(mcfg, tc, mesh)
  base_params = nnx.state(mixtral_jax.from_pretrained(base, mesh=mesh), nnx.Param).to_pure_dict()
  state = step_lib.init_state(mcfg, tc, mesh, params=base_params)
  base0 = jax.tree.map(np.asarray, state.base)
  assert {a.dtype for a in jax.tree.leaves(base0)} == {jnp.dtype("bfloat16")}
  adapters0 = jax.tree.map(np.asarray, state.params)
  shape = abstract_batch["inputs"].shape
  ids = np.random.default_rng(0).integers(0, mcfg.vocab_size, shape[:2] + (shape[2] + 1,)).astype(np.int32)
  batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": np.ones(shape, np.float32),
           "segment_ids": np.ones(shape, np.int32), "positions": np.broadcast_to(np.arange(shape[2], dtype=np.int32), shape)}
  batch = jax.device_put(batch, step_lib.batch_sharding(mesh))
  for _ in range(3):  # the first step has learning rate 0 (warmup)
    state, _ = fn(state, batch)
  for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(state.base)):
    assert np.array_equal(a, np.asarray(b))
  assert all(not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(adapters0), jax.tree.leaves(state.params)))


def test_export_merged_and_peft_match_our_unmerged_forward(hf_logits, straight, base, tmp_path):
  import peft
  import transformers

  section = lora_run.section(lora_run.read(straight))
  _, flat = lora_run.latest_adapters(straight)
  values = orbax_io.unflatten(flat)
  base_model = mixtral_jax.from_pretrained(base)
  unmerged = lora_merge.attach(base_model, section, values)
  ids = np.random.default_rng(1).integers(0, base_model.cfg.vocab_size, (2, 10)).astype(np.int32)
  fwd = nnx.jit(lambda m, x: m(x))
  ours = np.asarray(fwd(unmerged, ids))
  scale = np.abs(ours).max()
  assert np.abs(ours - np.asarray(fwd(base_model, ids))).max() > 1e-4  # trained
  loaded = mixtral_jax.from_pretrained(base, adapter=straight)  # our run as an adapter, merged on load
  assert np.abs(np.asarray(fwd(loaded, ids)) - ours).max() <= 1e-5 * scale

  assert cli(["export", straight, str(tmp_path / "merged"), "--merge"]) == 0
  hf_merged = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert np.abs(hf_logits(hf_merged, ids)[0] - ours).max() <= 1e-5 * scale

  assert cli(["export", straight, str(tmp_path / "adapter"), "--peft"]) == 0
  mixtral_jax.checkpoint.export(base, tmp_path / "base_hf")
  hf_base = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "base_hf")).eval()
  pm = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter")).eval()
  assert np.abs(hf_logits(pm, ids)[0] - ours).max() <= 1e-4 * scale
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
