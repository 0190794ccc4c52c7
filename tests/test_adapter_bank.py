"""Many adapters at once (``mixtral_jax.lora.bank``): a batch whose rows use different adapters, kept
unmerged in one bank, gives each row the logits of the base model with that row's adapter MERGED into its
weights (``lora.merge.merge_into``, an independent computation: W + A B alpha/r, then the plain model).

Covered: attention, router and LM-head adapters; per-expert adapters (w1, w2, w3) in every single-device
expert dispatch (dropless sorted groups, the small-batch selected path, with and without the per-layer
views that decode uses, and capacity buckets); ranks that differ between adapters (padded to the largest);
the base row (slot 0) equal to the plain model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.lora import adapters as adapters_lib
from mixtral_jax.lora import bank as bank_lib
from mixtral_jax.lora import merge
from mixtral_jax.lora.factors import Factors
from mixtral_jax.model import layer_views

VOCAB = 512


def random_factors(cfg, targets, rank, scale, seed, std=0.05):
  """One adapter: random A and B (B too, so every target changes the output) for ``targets``."""
  rng = np.random.default_rng(seed)
  out = []
  for t in targets:
    a, b = adapters_lib.shapes(cfg, t, rank)
    lead = () if t == "lm_head" else (cfg.num_hidden_layers,)
    out.append(Factors(t, rng.normal(0, std, lead + a).astype(np.float32),
                       rng.normal(0, std, lead + b).astype(np.float32), scale))
  return out


ATTN = dict(targets=("q", "v", "o"), rank=4, scale=2.0, seed=1)  # an attention adapter (PEFT's kind)
EXPERTS = dict(targets=("k", "router", "w1", "w2", "w3", "lm_head"), rank=2, scale=1.5, seed=2)  # per-expert


def build(dispatch):
  """(base, served bank model, [base, merged attn, merged experts]) of one tiny float32 config."""
  extra = {"capacity_factor": 4.0, "moe_impl": "dense"} if dispatch == "capacity" else {}
  cfg = mixtral_jax.get_config("tiny", vocab_size=VOCAB, dtype="float32", **extra)
  base = mixtral_jax.create_model(cfg, seed=1)
  adapters = [random_factors(cfg, **ATTN), random_factors(cfg, **EXPERTS)]
  bank = bank_lib.build_bank([("attn", adapters[0]), ("experts", adapters[1])], cfg)
  assert bank.section.slot_rank == 4 and bank.section.rank == 8  # rank 2 padded to 4, two adapters side by side
  served = bank_lib.attach_bank(base, bank)
  return base, served, [base] + [merge.merge_into(base, f) for f in adapters]


@pytest.fixture(scope="module")
def dropless():
  return build("dropless")


FWD = nnx.jit(lambda m, x: m(x))


def _rel(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_mixed_batch_logits_equal_merged_models(dropless, dispatch):
  base, served, refs = dropless if dispatch == "dropless" else build(dispatch)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 12)), jnp.int32)
  adapter_B = jnp.array([0, 1, 2, 1], jnp.int32)
  got = nnx.jit(lambda m, x, a: m(x, adapter_B=a))(served, ids, adapter_B)
  for r, slot in enumerate(np.asarray(adapter_B)):
    want = FWD(refs[slot], ids[r:r + 1])[0]
    assert _rel(got[r], want) <= 1e-5, (r, slot)
    if slot:  # the adapter matters: its logits are far from the base's
      assert _rel(want, FWD(base, ids[r:r + 1])[0]) > 1e-2
  # a bank given no rows' adapters computes the base
  assert _rel(FWD(served, ids), FWD(base, ids)) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("views", [False, True])
def test_mixed_decode_rows_equal_merged_models(dropless, views):
  """Three rows of one token each (the small-batch selected expert path, and the per-layer weight views
  the decode step reads on CPU): each row's logits equal its merged model's."""
  base, served, refs = dropless
  ids = jnp.asarray([[5], [17], [300]], jnp.int32)
  adapter_B = jnp.array([2, 0, 1], jnp.int32)
  layers = layer_views(served) if views else None
  got, _ = served.hidden(ids, adapter_B=adapter_B, layers=layers)
  got = served.logits(got, adapter_B)
  for r, slot in enumerate(np.asarray(adapter_B)):
    assert _rel(got[r], FWD(refs[slot], ids[r:r + 1])[0]) <= 1e-5, (r, slot)


def test_bank_names_and_bad_flags():
  assert bank_lib.parse_adapter_flags(["a=/x", "b.v2=/y"], "tiny") == [("a", "/x"), ("b.v2", "/y")]
  for flags, words in ((["noequals"], "NAME=PATH"), (["a=/x", "a=/y"], "already taken"),
                       (["tiny=/x"], "the base model"), (["=/x"], "NAME=PATH"), (["a b=/x"], "letters")):
    with pytest.raises(ValueError, match=words):
      bank_lib.parse_adapter_flags(flags, "tiny")
