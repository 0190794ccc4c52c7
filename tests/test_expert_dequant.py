"""The bucketed expert FFN on a quantized frozen base, dequantized one expert at a time
(``mixtral_jax.expert_dequant``): equal to ``dense_expert_ffn`` on the whole dequantized layer (forward and
gradients, with LoRA and dropout), a smaller compiled working set than that whole-layer path, and a
quantized model's dense-dispatch logits equal to its blocked path's (which dequantizes the layer whole)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import quant
from mixtral_jax.expert_adapters import ExpertLoRA
from mixtral_jax.expert_dequant import dense_expert_ffn_dequant
from mixtral_jax.experts import dense_expert_ffn
from mixtral_jax.inference.quantize import quantize
from mixtral_jax.model import Mixtral


def _stored(w, axis, mode):
  """(values, {suffix: sibling}) of ``w`` quantized along its contracted ``axis``."""
  values, extras = quant.FORMS[mode].quantize(w, (axis,))
  return values, extras


def _case(mode, E=4, C=8, D=64, F=128, r=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 10)
  x = jax.random.normal(ks[0], (E, C, D), jnp.float32)
  w1 = _stored(jax.random.normal(ks[1], (E, D, F)) * 0.1, -2, mode)
  w3 = _stored(jax.random.normal(ks[2], (E, D, F)) * 0.1, -2, mode)
  w2 = _stored(jax.random.normal(ks[3], (E, F, D)) * 0.1, -2, mode)
  ab = lambda k, i, o: (jax.random.normal(k, (E, i, r)) * 0.1, jax.random.normal(jax.random.fold_in(k, 1), (E, r, o)) * 0.1)  # noqa: E731
  lora = ExpertLoRA(w1=ab(ks[4], D, F), w3=ab(ks[5], D, F), w2=ab(ks[6], F, D),
                    key=jax.random.key_data(ks[7]), rate=0.25)
  rows = jnp.arange(E * C, dtype=jnp.int32).reshape(E, C)
  return x, (w1, w3, w2), lora, rows


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.slow
def test_equals_the_whole_layer_dequantized_forward_and_gradients(mode):
  x, ws, lora, rows = _case(mode)
  whole = tuple(quant.as_compute(w, jnp.float32) for w in ws)

  adapters = {t: lora.get(t) for t in ("w1", "w3", "w2")}

  def loss(fn, weights, x, ad):  # the adapters differentiated, the dropout key (an integer) closed over
    return jnp.sum(jnp.sin(fn(x, *weights, dataclasses.replace(lora, **ad), rows)))

  grad = lambda fn: jax.jit(jax.value_and_grad(lambda w, x, ad: loss(fn, w, x, ad), argnums=(1, 2)))  # noqa: E731
  ours = grad(dense_expert_ffn_dequant)(ws, x, adapters)
  ref = grad(dense_expert_ffn)(whole, x, adapters)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
  np.testing.assert_allclose(ours[1][0], ref[1][0], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(ours[1][1]), jax.tree.leaves(ref[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_float_layer_never_lives_whole_in_the_compiled_backward():
  """XLA:CPU's temporaries for the gradient: the whole-layer path holds E experts' float weights (and the
  nf4 lookup in between), the per-expert path about one expert's."""
  E, D, F = 8, 256, 1024
  x, ws, lora, rows = _case("nf4", E=E, C=16, D=D, F=F)
  lora = dataclasses.replace(lora, key=None, rate=0.0)

  def temp_bytes(per_expert):
    def loss(x, ad, ws):  # the stored weights are arguments, as parameters are (not foldable constants)
      lo = dataclasses.replace(lora, **ad)
      if per_expert:
        y = dense_expert_ffn_dequant(x, *ws, lo)
      else:
        y = dense_expert_ffn(x, *(quant.as_compute(w, jnp.float32) for w in ws), lo)
      return jnp.sum(y)
    adapters = {t: lora.get(t) for t in ("w1", "w3", "w2")}
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, adapters, ws).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  layer_float = 3 * E * D * F * 4  # the whole layer's float32 operands: 24 MiB
  whole, ours = temp_bytes(False), temp_bytes(True)
  assert whole >= layer_float
  assert ours < 0.4 * layer_float, (ours, whole)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.slow
def test_quantized_model_dense_dispatch_equals_blocked(mode):
  cfg = mixtral_jax.get_config("tiny", vocab_size=512, head_dim=64, dtype="float32", capacity_factor=1.5)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 24)), jnp.int32)
  logits = {}
  for impl in ("dense", "blocked"):
    model = quantize(Mixtral(cfg.replace(moe_impl=impl), rngs=nnx.Rngs(1)), mode)
    logits[impl] = np.asarray(model(ids))
  np.testing.assert_allclose(logits["dense"], logits["blocked"], rtol=1e-5, atol=1e-5)
