"""The whole model with blockwise attention: logits against transformers on sequences of over a
thousand tokens, with and without a sliding window shorter than the sequence; and KV-cache decoding
(left-padded prompt, rolling cache past the window, cache spanning several blocks) against the
model's own full forward, as in test_kv_cache."""

import numpy as np
import pytest
from flax import nnx
from reference import TINY, hf_logits, hf_model
from test_kv_cache import _model, _run

import mixtral_jax

T_LONG = 1100


@pytest.mark.parametrize("window", [None, 300])
def test_long_sequence_logits_match_transformers_with_blockwise_attention(window, tmp_path):
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


def test_rolling_cache_decode_with_blockwise_attention():
  """Window 7 (a 7-slot rolling cache), blocks of 4 keys: a left-padded prefill of 12 tokens (longer
  than the window), then one-token steps past the window, each against the full forward."""
  model = _model(sliding_window=7, attention_impl="blockwise", attention_block=4)
  rs = np.random.RandomState(12)
  seqs = [rs.randint(0, 1000, 12 + 8).tolist(), rs.randint(0, 1000, 9 + 8).tolist()]
  cache = _run(model, seqs, chunks=[12] + [1] * 8, cache_len=64)
  assert cache.size == 7
