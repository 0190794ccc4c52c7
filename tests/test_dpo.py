"""DPO/IPO losses and rewards against a float64 NumPy recomputation of the published formulas, and the
preference JSONL reader."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.train import dpo
from mixtral_jax.train.data import preference, synthetic_preference


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def numpy_dpo(pc, pr, rc, rr, beta, eps, loss_type, mask):
  """Rafailov et al. 2023 eq. 7 (with cDPO label smoothing) and Azar et al. 2023 eq. 17, float64."""
  pc, pr, rc, rr, mask = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr, mask))
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    losses = -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
  else:
    losses = (h - 1 / (2 * beta)) ** 2
  cr, rj = beta * (pc - rc), beta * (pr - rr)
  m = lambda x: np.sum(x * mask) / np.sum(mask)  # noqa: E731
  return m(losses), {"chosen_reward": m(cr), "rejected_reward": m(rj), "reward_margin": m(cr - rj),
                     "accuracy": m((cr > rj).astype(np.float64))}


def _logps(seed, n=16):
  rng = np.random.default_rng(seed)
  base = rng.uniform(-80, -5, (4, n)).astype(np.float32)
  return base[0], base[1], base[0] + rng.normal(0, 2, n).astype(np.float32), base[1] + rng.normal(0, 2, n).astype(np.float32)


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.1), ("sigmoid", 0.01, 0.3),
                                                ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0)])
def test_loss_and_rewards_equal_float64_numpy(loss_type, beta, eps):
  pc, pr, rc, rr = _logps(0)
  mask = np.ones(16, np.float32)
  mask[-3:] = 0  # padding pairs
  loss, metrics = jax.jit(lambda *a: dpo.dpo_loss(*a, beta=beta, label_smoothing=eps, loss_type=loss_type,
                                                  pair_mask_B=mask))(pc, pr, rc, rr)
  ref_loss, ref_metrics = numpy_dpo(pc, pr, rc, rr, beta, eps, loss_type, mask)
  scale = max(1.0, abs(ref_loss))
  assert abs(float(loss) - ref_loss) <= 1e-6 * scale
  for k, v in ref_metrics.items():
    assert abs(float(metrics[k]) - v) <= 1e-6 * max(1.0, abs(v)), k


def test_gradient_equals_the_analytic_one():
  """d loss / d log pi(y_w) = -beta * sigmoid(-beta h) (1 - eps) + beta * eps * sigmoid(beta h), over B;
  and the reference log-probs get no gradient."""
  pc, pr, rc, rr = _logps(1, n=8)
  beta, eps = 0.2, 0.1
  grads = jax.grad(lambda *a: dpo.dpo_loss(*a, beta=beta, label_smoothing=eps)[0], argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  d_pc = (-(1 - eps) * beta * sig(-beta * h) + eps * beta * sig(beta * h)) / 8
  np.testing.assert_allclose(grads[0], d_pc, rtol=0, atol=1e-7)
  np.testing.assert_allclose(grads[1], -d_pc, rtol=0, atol=1e-7)
  assert not np.any(grads[2]) and not np.any(grads[3])


def test_sequence_logprobs_equal_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 3, (3, 7, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (3, 7)).astype(np.int32)
  weights = np.zeros((3, 7), np.float32)
  weights[0, 3:] = 1
  weights[1, 1:5] = 1
  weights[2, 6] = 1
  lp = logits.astype(np.float64) - np.log(np.sum(np.exp(logits.astype(np.float64)), -1, keepdims=True))
  per_tok = np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  want = np.sum(per_tok * weights[:, 1:], -1)
  np.testing.assert_allclose(dpo.sequence_logprobs(logits, tokens, weights), want, rtol=1e-6)
  np.testing.assert_allclose(dpo.sequence_logprobs(logits, tokens, weights, average=True),
                             want / weights[:, 1:].sum(-1), rtol=1e-6)


def test_accuracy_counts_ties_as_wrong_and_split_pairs():
  zero = np.zeros(4, np.float32)
  _, metrics = dpo.dpo_loss(zero, zero, zero, zero)
  assert float(metrics["accuracy"]) == 0.0
  c, r = dpo.split_pairs(jnp.arange(8))
  assert list(c) == [0, 1, 2, 3] and list(r) == [4, 5, 6, 7]


@pytest.mark.parametrize("kw,match", [({"loss_type": "hinge"}, "dpo.loss_type='hinge'"),
                                      ({"beta": 0.0}, "dpo.beta=0.0 must be > 0"),
                                      ({"label_smoothing": 0.6}, r"dpo.label_smoothing=0.6 must be in \[0, 0.5\)"),
                                      ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid loss only")])
def test_bad_options_name_the_setting(kw, match):
  with pytest.raises(ValueError, match=match):
    dpo.dpo_loss(*_logps(3), **kw)


# ------------------------------------------------------------------------------------ preference JSONL

def _write(tmp_path, lines):
  path = tmp_path / "prefs.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" if not isinstance(x, str) else x + "\n" for x in lines))
  return str(path)


def test_pairs_encode_through_the_chat_template(tmp_path):
  from mixtral_jax.chat import mistral_tokenizer
  sp = mistral_tokenizer("v1").instruct_tokenizer.tokenizer
  path = _write(tmp_path, [
      {"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"},
      "",
      {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "What is 1+1?"}],
       "chosen": [{"role": "assistant", "content": "It is 2."}], "rejected": [{"role": "assistant", "content": "3"}]},
  ])
  pairs = list(preference.preference_pairs(path))
  assert [off for off, _ in pairs][0] == 0 and len(pairs) == 2
  first, second = pairs[0][1], pairs[1][1]
  # the prompt is [INST] ... [/INST] by mistral-common; the answers decode back to their text, EOS last
  from mistral_common.protocol.instruct.messages import UserMessage
  from mistral_common.protocol.instruct.request import ChatCompletionRequest
  want = mistral_tokenizer("v1").encode_chat_completion(
      ChatCompletionRequest(messages=[UserMessage(content="What is 2+3?")])).tokens
  assert first.prompt == list(want)
  assert sp.decode(first.chosen[:-1]).strip() == "5" and first.chosen[-1] == sp.eos_id
  assert sp.decode(second.chosen[:-1]).strip() == "It is 2." and sp.decode(second.rejected[:-1]).strip() == "3"
  batch = preference.pair_batch([first, second], seq_len=64)
  assert batch["inputs"].shape == (4, 64) and set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  n = len(first.prompt)
  row0 = first.prompt + first.chosen
  np.testing.assert_array_equal(batch["inputs"][0, :len(row0)], row0)
  np.testing.assert_array_equal(batch["targets"][0, :len(row0) - 1], row0[1:])
  np.testing.assert_array_equal(batch["inputs"][2, :n + len(first.rejected)], first.prompt + first.rejected)
  # the answer's tokens are the weighted targets; the prompt predicts none of them
  np.testing.assert_array_equal(batch["targets"][0][batch["weights"][0] > 0], first.chosen)
  assert batch["segment_ids"][0].sum() == len(row0) and batch["segment_ids"][3].sum() == len(second.prompt + second.rejected)


@pytest.mark.parametrize("record,match", [
    ({"prompt": "q", "rejected": "b"}, "2: not a usable preference pair: the 'chosen' answer is missing"),
    ({"prompt": "q", "chosen": "a"}, "2: .*the 'rejected' answer is missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "2: .*'rejected' is an empty answer"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"}, "'chosen' is an empty answer"),
    ({"chosen": "a", "rejected": "b"}, "'prompt' .* or 'messages' is missing"),
])
def test_bad_lines_name_file_and_line(tmp_path, record, match):
  path = _write(tmp_path, [{"prompt": "fine", "chosen": "a", "rejected": "b"}, record])
  with pytest.raises(ValueError, match=rf"prefs\.jsonl:{match}" if match.startswith("2:") else match):
    list(preference.preference_pairs(path))


def test_synthetic_sums_are_a_valid_learnable_set(tmp_path):
  train_path, held_path = synthetic_preference.write(str(tmp_path), pairs=50, heldout=10)
  records = [json.loads(line) for line in open(train_path)]
  assert len(records) == 50 and records == synthetic_preference.sum_pairs(50, 0)
  for r in records:
    a, b = (int(x) for x in r["prompt"][len("What is "):-1].split("+"))
    assert int(r["chosen"]) == a + b and int(r["rejected"]) != a + b and int(r["rejected"]) >= 0
  assert len(list(preference.preference_pairs(held_path))) == 10


def test_a_prompt_too_long_for_seq_len_is_refused():
  with pytest.raises(ValueError, match="leaves no room for its answer in seq_len=4"):
    preference.pair_rows(preference.Pair([1, 2, 3, 4], [5, 2], [6, 2]), 4)


def test_pair_rows_through_the_batch_iterator_unflatten_to_pair_batch(tmp_path):
  from mixtral_jax.train.data.pipeline import BatchIterator
  pairs = [preference.Pair([1, 5, 6], [7, 2], [8, 9, 2]), preference.Pair([1, 4], [3, 2], [5, 2]),
           preference.Pair([1, 9, 9, 9], [6, 2], [7, 7, 2]), preference.Pair([1, 3], [3, 3, 2], [4, 2])]
  it = BatchIterator(preference.PairRows(pairs, 8), batch_size=4, grad_accum=2, seed=0, shuffle=False, threads=0,
                     prefetch=0)
  batch = next(it)
  assert batch["inputs"].shape == (2, 2, 16)  # [A, b, 2T]
  for a in range(2):
    want = preference.pair_batch(pairs[2 * a:2 * a + 2], 8)
    for k, v in want.items():
      np.testing.assert_array_equal(preference.unflatten_pairs(batch[k][a], 8), v, err_msg=k)
