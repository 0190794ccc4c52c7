"""Logit parity with transformers' MixtralForCausalLM through Hugging Face files: one file, sharded
files, bf16 files and the fused key layout, for every architectural variant (tests/reference.py).

fp32 criterion: max |ours - theirs| / max |theirs| <= 1e-4, and the top-k expert ids agree in every layer.
"""

import copy
import glob
import os

import numpy as np
import pytest
from flax import nnx
from reference import TINY, VARIANTS

import mixtral_jax

pytestmark = pytest.mark.slow

IDS = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 11)).astype(np.int32)
# Compiled once per config: models loaded from different files of one config reuse it.
forward = nnx.jit(lambda model, ids: model(ids, return_router_logits=True))


def assert_parity(model, ref_logits, ref_router, k):
  logits, aux = forward(model, IDS)
  logits = np.asarray(logits)
  err = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
  assert err <= 1e-4, f"relative logit error {err:.2e}"
  ours = np.asarray(aux["router_logits"]).reshape(ref_router.shape)  # [L, B*T, E], token order b-major as HF
  top_ours = np.sort(np.argsort(-ours, axis=-1)[..., :k], axis=-1)
  top_ref = np.sort(np.argsort(-ref_router, axis=-1)[..., :k], axis=-1)
  mismatched = np.argwhere((top_ours != top_ref).any(-1))
  assert mismatched.size == 0, f"top-{k} experts differ at (layer, token) {mismatched[:5].tolist()}"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(hf_logits, hf_model, save_hf, request, tmp_path_factory):
  """One transformers model per variant, saved three ways, with its reference logits."""
  import torch

  name = request.param
  hf = hf_model(seed=len(name), **VARIANTS[name])
  root = tmp_path_factory.mktemp(name)
  dirs = {"single": save_hf(hf, root / "single"), "sharded": save_hf(hf, root / "sharded", shard_size="100KB")}
  ref = {"fp32": hf_logits(hf, IDS)}
  rounded = copy.deepcopy(hf).to(torch.bfloat16)  # Module.to works in place: keep `hf` fp32
  dirs["bf16"] = save_hf(rounded, root / "bf16", dtype="bfloat16")
  ref["bf16"] = hf_logits(rounded.to(torch.float32), IDS)  # the same model, weights rounded to bf16
  return name, dirs, ref


@pytest.mark.parametrize("kind", ["single", "sharded", "bf16"])
def test_parity_with_transformers(variant, kind):
  name, dirs, ref = variant
  if kind == "sharded":
    assert len(glob.glob(os.path.join(dirs[kind], "model-*.safetensors"))) > 1
  model = mixtral_jax.from_pretrained(dirs[kind], param_dtype="float32")
  logits, router = ref["bf16" if kind == "bf16" else "fp32"]
  assert_parity(model, logits, router, {**TINY, **VARIANTS[name]}["num_experts_per_tok"])


def test_bf16_files_default_to_bf16_params(variant):
  _, dirs, _ = variant
  model = mixtral_jax.from_pretrained(dirs["bf16"])
  assert model.cfg.param_dtype == "bfloat16" and model.blocks.moe.w1_EDF[...].dtype == np.dtype("bfloat16")


def test_fused_key_layout(hf_logits, hf_model, tmp_path):
  """transformers >= 5 keeps experts fused in memory (gate_up_proj [E, 2F, D], down_proj [E, D, F]);
  a state_dict saved as is must load the same."""
  from safetensors.torch import save_file

  hf = hf_model(seed=3)
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  hf.config.to_json_file(str(tmp_path / "config.json"))
  assert_parity(mixtral_jax.from_pretrained(tmp_path), *hf_logits(hf, IDS), TINY["num_experts_per_tok"])
