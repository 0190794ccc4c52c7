"""DPO on the model: answer log-probs against a float64 recomputation from the full logits, the reference
equal to the base without adapters, and a few steps that learn a batch's preferences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixtral_jax.config import get_config
from mixtral_jax.lora import LoraSection, LoRAParam
from mixtral_jax.lora.merge import attach
from mixtral_jax.model import Mixtral
from mixtral_jax.train import dpo

pytestmark = pytest.mark.slow  # transformers references / several compiles

CFG = get_config("tiny", vocab_size=256, num_hidden_layers=2, dtype="float32")
LORA = LoraSection(rank=4, alpha=8, targets=("q", "v", "w1", "w2", "w3"))
T = 16


def _batch(pairs=3, seed=0):
  """[2B, T] rows in pair_batch's layout: shared random prompts, different random answers."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, CFG.vocab_size, (2 * pairs, T)).astype(np.int32)
  inputs[pairs:, :6] = inputs[:pairs, :6]  # the prompt (6 tokens) is the same in both rows of a pair
  targets = np.concatenate([inputs[:, 1:], rng.integers(1, CFG.vocab_size, (2 * pairs, 1))], 1).astype(np.int32)
  weights = np.zeros((2 * pairs, T), np.float32)
  weights[:, 5:12] = 1.0  # targets 5.. are the answer
  segment_ids = np.zeros((2 * pairs, T), np.int32)
  segment_ids[:, :12] = 1
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (2 * pairs, T)).copy()
  return {"inputs": inputs, "targets": targets, "weights": weights, "segment_ids": segment_ids,
          "positions": positions}


@pytest.fixture(scope="module")
def models():
  base = Mixtral(CFG, rngs=nnx.Rngs(0))
  lora_model = attach(base, LORA)
  # nonzero B, so the policy differs from the base
  graphdef, adapters, rest = nnx.split(lora_model, LoRAParam, ...)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)
  return base, nnx.merge(graphdef, adapters, rest)


def test_answer_logprobs_equal_float64_from_the_full_logits(models):
  _, policy = models
  mb = _batch()
  logp, _ = dpo.answer_logprobs(policy, mb, chunk=8)
  logits = np.asarray(policy(jnp.asarray(mb["inputs"]), attention_mask=jnp.asarray(mb["segment_ids"] > 0),
                             segment_ids=jnp.asarray(mb["segment_ids"])), np.float64)
  lsm = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  want = np.sum(np.take_along_axis(lsm, mb["targets"][..., None], -1)[..., 0] * mb["weights"], -1)
  np.testing.assert_allclose(np.asarray(logp), want, rtol=2e-5)


def test_reference_is_the_base_without_adapters(models):
  base, policy = models
  mb = _batch()
  ref, _ = dpo.answer_logprobs(dpo.adapters_off(policy), mb, chunk=8)
  plain, _ = dpo.answer_logprobs(base, mb, chunk=8)
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(plain))
  pol, _ = dpo.answer_logprobs(policy, mb, chunk=8)
  assert np.max(np.abs(np.asarray(pol) - np.asarray(ref))) > 1e-3  # the adapters do act on the policy


def test_step_zero_is_log2_and_dpo_without_lora_is_refused(models):
  base, _ = models
  fresh = attach(base, LORA)  # B = 0: the policy is the reference
  loss, m = dpo.microbatch_loss(fresh, _batch(), beta=0.1, label_smoothing=0.0, loss_type="sigmoid", chunk=8,
                                num_microbatches=1)
  assert abs(float(m["dpo_loss"]) - np.log(2)) < 1e-6 and float(m["reward_margin"]) == 0.0
  with pytest.raises(ValueError, match="set lora.rank"):
    dpo.adapters_off(base)


def test_a_few_steps_learn_the_batch_preferences(models):
  base, _ = models
  graphdef, adapters, rest = nnx.split(attach(base, LORA), LoRAParam, ...)
  mb = {k: jnp.asarray(v) for k, v in _batch(pairs=4, seed=3).items()}
  tx = optax.adam(1e-2)
  opt = tx.init(adapters)

  @jax.jit
  def step(adapters, rest, opt):
    def f(a):  # fresh State objects inside the trace, as the train step builds them
      model = nnx.merge(graphdef, a, jax.tree.map(lambda x: x, rest))
      return dpo.microbatch_loss(model, mb, beta=0.5, label_smoothing=0.0, loss_type="sigmoid", chunk=8,
                                 num_microbatches=1)
    (_, m), g = jax.value_and_grad(f, has_aux=True)(adapters)
    up, opt = tx.update(g, opt, adapters)
    return optax.apply_updates(adapters, up), opt, m

  first = None
  for _ in range(8):
    adapters, opt, m = step(adapters, rest, opt)
    first = first or float(m["dpo_loss"])
  assert float(m["dpo_loss"]) < first - 0.1 and float(m["accuracy"]) == 1.0 and float(m["reward_margin"]) > 0
