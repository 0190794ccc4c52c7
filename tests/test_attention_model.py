"""The whole model with blockwise attention: logits against transformers on sequences of over a
thousand tokens, with and without a sliding window shorter than the sequence; and KV-cache decoding
(left-padded prompt, rolling cache past the window, cache spanning several blocks) against the
model's own full forward, as in test_kv_cache."""

import numpy as np
import pytest
from flax import nnx
from reference import TINY
from test_kv_cache import _model, _run

import mixtral_jax

T_LONG = 1100


@pytest.mark.parametrize("window", [None, 300])
def test_long_sequence_logits_match_transformers_with_blockwise_attention(hf_logits, hf_model, window, tmp_path):
  hf = hf_model(seed=5, max_position_embeddings=2048, sliding_window=window)
  hf.save_pretrained(str(tmp_path), safe_serialization=True)
  ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], (1, T_LONG)).astype(np.int32)
  want, _ = hf_logits(hf, ids)
  model = mixtral_jax.from_pretrained(tmp_path, param_dtype="float32", attention_impl="blockwise",
                                      attention_block=256)
  assert model.cfg.sliding_window == window
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= 1e-5, f"relative logit error {err:.2e}"


@pytest.mark.slow
def test_rolling_cache_decode_with_blockwise_attention():
  """Window 7 (a 7-slot rolling cache), blocks of 4 keys: a left-padded prefill of 12 tokens (longer
  than the window), then one-token steps past the window, each against the full forward."""
  model = _model(sliding_window=7, attention_impl="blockwise", attention_block=4)
  rs = np.random.RandomState(12)
  seqs = [rs.randint(0, 1000, 12 + 8).tolist(), rs.randint(0, 1000, 9 + 8).tolist()]
  cache = _run(model, seqs, chunks=[12] + [1] * 8, cache_len=64)
  assert cache.size == 7


def test_long_prefill_and_decode_never_build_full_scores():
  """Under attention_impl=auto on CPU: the program of a 2048-token prefill into a 4096-slot cache has
  no tensor of [T, S] or [T, T] scores, and a one-token decode step over a 32768-slot cache has no
  [1, S]-wide one (lowered only, not compiled or run)."""
  import re

  import jax
  import jax.numpy as jnp

  cfg = mixtral_jax.MixtralConfig(**{**TINY, "max_position_embeddings": 65536})
  model = nnx.eval_shape(lambda: mixtral_jax.Mixtral(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)

  def hidden(state, ids, positions, cache):
    return nnx.merge(graphdef, state).hidden(ids, positions=positions, cache=cache)[0]

  def lowered_text(T, S):
    cache = jax.eval_shape(lambda: mixtral_jax.init_cache(cfg, 1, S))
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
    return jax.jit(hidden).lower(state, ids, ids, cache).as_text()

  def shapes_with(text, a, b):
    return sorted(set(re.findall(rf"tensor<(?:[0-9]+x)*{a}x(?:[0-9]+x)*{b}x[a-z0-9]+>", text)))

  prefill = lowered_text(2048, 4096)
  for a, b in ((2048, 4096 + 2048), (2048, 2048)):
    assert not shapes_with(prefill, a, b), f"[{a}, {b}] scores in the prefill: {shapes_with(prefill, a, b)}"
  assert "while" in prefill  # the blockwise loop over key blocks
  decode = lowered_text(1, 32768)
  wide = [s for s in re.findall(r"tensor<([0-9x]+)xf32>", decode) if any(int(d) > 4096 for d in s.split("x"))
          and int(s.split("x")[-1]) != cfg.head_size]
  assert not wide, f"decode builds key-wide float32 tensors other than K/V: {sorted(set(wide))[:5]}"


@pytest.mark.slow
def test_training_gradients_with_blockwise_equal_dense():
  """Gradients of a packed, padded batch's loss through the scanned, rematerialised model: blockwise
  (blocks of 16, window 20) against dense, every parameter."""
  import jax
  import jax.numpy as jnp

  seg = np.ones((2, 70), np.int32)
  seg[:, 30:] = 2
  seg[1, 60:] = 0
  pos = np.where(seg == 1, np.arange(70), np.arange(70) - 30).astype(np.int32)
  ids = np.random.RandomState(4).randint(0, 1000, (2, 70)).astype(np.int32)
  w = jnp.asarray(np.random.RandomState(5).normal(size=(2, 70, TINY["vocab_size"])) * (seg > 0)[:, :, None],
                  jnp.float32)

  def grads(impl):
    model = _model(sliding_window=20, remat="full", attention_impl=impl, attention_block=16)

    def loss(model):
      logits = model(ids, attention_mask=jnp.asarray(seg > 0), positions=jnp.asarray(pos),
                     segment_ids=jnp.asarray(seg))
      return jnp.sum(logits * w)

    return nnx.jit(nnx.grad(loss))(model)

  got, want = grads("blockwise"), grads("dense")
  for path, g in nnx.to_flat_state(got):
    ref = dict(nnx.to_flat_state(want))[path]
    err = np.abs(np.asarray(g[...]) - np.asarray(ref[...])).max()
    assert err <= 1e-5 * max(1.0, np.abs(np.asarray(ref[...])).max()), f"{path}: {err:.2e}"
