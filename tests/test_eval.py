"""eval/: log-likelihoods and perplexity against transformers on the same weights."""

import math

import numpy as np
import pytest
import torch

import mixtral_jax
from mixtral_jax.eval import loglikelihood, perplexity, token_logprobs


@pytest.fixture(scope="module")
def models(hf_model, save_hf, tmp_path_factory):
  hf = hf_model(seed=3)
  path = save_hf(hf, tmp_path_factory.mktemp("hf_eval"))
  return hf, mixtral_jax.from_pretrained(path)


def _hf_logprobs(hf, seq):
  with torch.no_grad():
    logits = hf(torch.tensor([seq])).logits[0].double()
  return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].numpy(), logits


@pytest.mark.slow
def test_token_logprobs_and_perplexity_match_transformers(models):
  hf, ours = models
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, 1000, n).tolist() for n in (5, 17, 40, 9)]  # ragged: right padding inside a batch
  got = token_logprobs(ours, seqs, batch_size=3)
  nll, count = 0.0, 0
  for seq, lp in zip(seqs, got):
    want, _ = _hf_logprobs(hf, seq)
    assert lp.shape == (len(seq) - 1,)
    np.testing.assert_allclose(lp, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # transformers' own shifted mean cross-entropy
      loss = hf(torch.tensor([seq]), labels=torch.tensor([seq])).loss.item()
    nll += loss * (len(seq) - 1)
    count += len(seq) - 1
  assert perplexity(ours, seqs, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_loglikelihood_matches_transformers(models):
  hf, ours = models
  ctx, cont = [5, 17, 99, 3, 250], [42, 7, 8]
  want, logits = _hf_logprobs(hf, ctx + cont)
  greedy = logits[:-1].argmax(-1).numpy()[len(ctx) - 1:] == np.array(cont)
  ll, is_greedy = loglikelihood(ours, ctx, cont)
  assert ll == pytest.approx(float(want[len(ctx) - 1:].sum()), rel=1e-4, abs=1e-4)
  assert is_greedy == bool(greedy.all())
  # The model's own greedy continuation is reported as greedy.
  first = int(logits[len(ctx) - 1].argmax())
  assert loglikelihood(ours, ctx, [first])[1] is True


@pytest.mark.parametrize("seqs, match", [([], "no sequences"), ([[1]], "at least 2"),
                                         ([[1, 5000]], "outside the model's vocabulary"),
                                         ([[1] * 300], "context")])
def test_bad_input_names_the_cause(models, seqs, match):
  with pytest.raises(ValueError, match=match):
    token_logprobs(models[1], seqs)
