"""eval/: routing statistics, passkey prompts and scoring, and perplexity, each against an independent
recomputation (transformers' router logits and log-probs, exact enumeration, the tokenizer itself)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

import mixtral_jax
from mixtral_jax.cli import main as cli
from mixtral_jax.eval.passkey import FILLER, KEY_LINE, QUESTION, make_prompt, score_answer, write_training_text
from mixtral_jax.eval.text_perplexity import against_context, strided
from mixtral_jax.eval.routing import router_logits, routing_stats, uniform_baselines
from mixtral_jax.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(hf_model, save_hf_with_tokenizer, tmp_path_factory):
  hf = hf_model(seed=7, vocab_size=32000, num_hidden_layers=2)
  path = save_hf_with_tokenizer(hf, tmp_path_factory.mktemp("analysis") / "model")
  return hf, mixtral_jax.from_pretrained(path), path


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.load("v1")


# ------------------------------------------------------------------------------ routing


def _numpy_stats(logits_LTE_list, k):
  """Table 5's statistics, written plainly from per-token expert sets."""
  L, _, E = logits_LTE_list[0].shape
  out = {"share_first": np.zeros((L, E)), "share_either": np.zeros((L, E)), "repeat_first": np.zeros(L),
         "repeat_topk": np.zeros(L)}
  tokens = sum(lg.shape[1] for lg in logits_LTE_list)
  pairs = sum(lg.shape[1] - 1 for lg in logits_LTE_list)
  for lg in logits_LTE_list:
    for layer in range(L):
      firsts = [int(np.argmax(row)) for row in lg[layer]]
      sets = [set(np.argsort(row)[-k:].tolist()) for row in lg[layer]]
      for f, s in zip(firsts, sets):
        out["share_first"][layer, f] += 1 / tokens
        for e in s:
          out["share_either"][layer, e] += 1 / tokens
      for t in range(len(firsts) - 1):
        out["repeat_first"][layer] += (firsts[t] == firsts[t + 1]) / pairs
        out["repeat_topk"][layer] += bool(sets[t] & sets[t + 1]) / pairs
  return out


def test_routing_statistics_match_numpy_from_transformers_router_logits(hf_logits, models):
  hf, ours, _ = models
  rng = np.random.default_rng(0)
  seqs = [rng.integers(3, 32000, n).tolist() for n in (40, 40, 23)]  # the short one is padded in its batch
  got = router_logits(ours, seqs, batch_size=2)
  ref = []
  for s in seqs:
    _, r = hf_logits(hf, np.array([s]))  # [L, T, E]
    ref.append(r)
    np.testing.assert_allclose(got[len(ref) - 1], r, atol=1e-4)
  stats = routing_stats(got, k=2)
  want = _numpy_stats(ref, k=2)
  for key, value in want.items():
    np.testing.assert_allclose(np.array(stats[key]), value, atol=1e-12, err_msg=key)
  assert stats["tokens"] == 103 and stats["pairs"] == 100


def test_uniform_baselines_by_enumeration():
  for E, k in ((8, 2), (8, 1), (4, 2)):
    subsets = list(itertools.combinations(range(E), k))
    share = np.mean([bool(set(a) & set(b)) for a in subsets for b in subsets])
    assert uniform_baselines(E, k)["repeat_topk"] == pytest.approx(share)
    assert uniform_baselines(E, k)["repeat_first"] == 1 / E
  assert uniform_baselines(8, 2)["repeat_topk"] == pytest.approx(0.4643, abs=1e-4)


def test_routing_cli_writes_json_pages_and_plots(models, tmp_path, capsys):
  _, _, path = models
  mine = tmp_path / "mine.txt"
  mine.write_text("SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;\n" * 8)
  out = tmp_path / "routing"
  assert cli(["eval", "routing", "--model", path, "--out", str(out), "--domains", "python,math", "--domain",
              f"sql={mine}", "--tokens", "96", "--seq-len", "48", "--no-progress"]) == 0
  result = json.loads((out / "routing.json").read_text())
  assert set(result["domains"]) == {"python", "math", "sql"} and result["layers"] == 2
  for s in result["domains"].values():
    assert np.allclose(np.sum(s["share_first"], axis=1), 1) and np.allclose(np.sum(s["share_either"], axis=1), 2)
  page = (out / "layer_01.html").read_text()
  assert page.count("<span") > 96 and ">SELECT<" in page
  assert (out / "routing_experts.png").stat().st_size > 0 and (out / "routing_repetition.png").stat().st_size > 0
  # Bad input: an empty domain file, and an output folder that exists.
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert cli(["eval", "routing", "--model", path, "--out", str(tmp_path / "r2"), "--domains", "math",
              "--domain", f"nothing={empty}"]) == 2
  assert "holds no text" in capsys.readouterr().err
  assert cli(["eval", "routing", "--model", path, "--out", str(out), "--domains", "math"]) == 2
  assert "--overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------ passkey


@pytest.mark.parametrize("length, depth", [(100, 0.0), (300, 0.3), (1000, 0.5), (1000, 1.0)])
def test_passkey_key_is_where_it_says(tokenizer, length, depth):
  p = make_prompt(tokenizer, length, depth, "48213")
  unit = len(tokenizer.encode(FILLER, bos=False))
  assert length - 2 * unit <= len(p.ids) <= length
  assert p.ids == tokenizer.encode(p.text)
  assert tokenizer.decode(p.ids[p.key_token:]).startswith("The pass key is 48213. Remember it.")
  assert tokenizer.decode(p.ids).endswith(QUESTION)
  # The key's depth, measured in filler sentences before it over all filler sentences.
  before = p.text[:p.text.index("The pass key is")].count(FILLER)
  total = p.text.count(FILLER)
  assert p.actual_depth == pytest.approx(before / total)
  assert abs(before / total - depth) <= 0.5 / total + 1e-9


def test_passkey_scorer():
  assert score_answer(" 48213. Remember it.", "48213")
  assert score_answer("The pass key is 48213", "48213")
  assert not score_answer(" 4821", "48213")
  assert not score_answer(" 482130", "48213")
  assert not score_answer(" 12345 48213", "48213")  # the first number is the answer
  assert not score_answer("", "48213")


def test_passkey_cli_and_its_limits(models, tmp_path, capsys):
  _, _, path = models
  out = tmp_path / "passkey"
  assert cli(["eval", "passkey", "--model", path, "--lengths", "128", "--depths", "0,1", "--trials", "2",
              "--out", str(out), "--no-progress"]) == 0
  result = json.loads((out / "passkey.json").read_text())
  assert len(result["records"]) == 4 and set(result["accuracy"]["128"]) == {"0", "1"}
  for r in result["records"]:
    assert r["correct"] == score_answer(r["answer"], r["key"]) and r["tokens"] <= 128
  assert (out / "passkey.png").stat().st_size > 0
  assert cli(["eval", "passkey", "--model", path, "--lengths", "1k", "--out", str(tmp_path / "p2")]) == 2
  assert "max_position_embeddings=256" in capsys.readouterr().err
  assert cli(["eval", "passkey", "--model", path, "--lengths", "300", "--depths", "0.5", "--trials", "1",
              "--allow-beyond", "--out", str(tmp_path / "p3"), "--no-progress"]) == 0
  assert json.loads((tmp_path / "p3" / "passkey.json").read_text())["records"][0]["tokens"] > 256
  data = tmp_path / "data"
  assert cli(["eval", "passkey", "--write-data", str(data), "--count", "5", "--data-lengths", "80,120"]) == 0
  texts = [f.read_text() for f in sorted(data.iterdir())]
  assert len(texts) == 5 and all(t.endswith(".") and "The pass key is" in t for t in texts)
  rows = tmp_path / "rows"  # padded to whole training rows: <s> text </s> is exactly --data-row tokens
  assert cli(["eval", "passkey", "--write-data", str(rows), "--count", "4", "--data-row", "128"]) == 0
  tok = Tokenizer.load("v1")
  for f in rows.iterdir():
    text = f.read_text()
    key = text[text.index("The pass key is ") + 16:][:5]
    assert len(tok.encode(text, bos=True, eos=True)) == 128 and text.count(f"The pass key is {key}.") == 2



def test_passkey_training_rows_padded_with_repeated_answers(tmp_path):
  """--data-pad question: each document is still exactly one row, holds its key line once, and its
  question-and-answer as many whole times as fit in the row (checked by counting with the tokenizer)."""
  tok = Tokenizer.load("v1")
  paths = write_training_text(tok, str(tmp_path), 3, 74, 136, seed=1, row=144, pad="question")
  qa_tokens = len(tok.encode(QUESTION + " 12345.", bos=False))  # the tokens one more repeat adds
  for path in paths:
    text = open(path).read()
    key = text[text.index("The pass key is ") + 16:][:5]
    assert len(tok.encode(text, bos=True, eos=True)) == 144
    assert text.count(KEY_LINE.format(key=key)) == 1
    qa = f"{QUESTION} {key}."
    n = text.count(qa)
    assert n >= 1 and text.count("The pass key is") == 1 + n  # no other key anywhere
    head = text[:text.rindex(qa) + len(qa)]
    assert len(tok.encode(head, bos=True, eos=True)) + qa_tokens > 144  # one more would not have fit
  with pytest.raises(ValueError, match="filler or question"):
    write_training_text(tok, str(tmp_path / "x"), 1, 74, 136, row=144, pad="answers")

# ------------------------------------------------------------------------------ perplexity


def _hf_token_logprobs(hf, ids):
  with torch.no_grad():
    logits = hf(torch.tensor([ids])).logits[0].double()
  return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_strided_and_context_perplexity_match_transformers(models, tokenizer):
  hf, ours, _ = models
  text = open(json.__file__).read()[:1200]  # the json package's own source
  ids = tokenizer.encode(text)
  window, stride = 64, 24
  got = strided(ours, tokenizer, {"t": text}, window=window, stride=stride, batch_size=4)
  nll, count, scored_to = 0.0, 0, 1  # Hugging Face's strided recipe, written out
  for begin in range(0, len(ids), stride):
    end = min(begin + window, len(ids))
    new = end - scored_to
    lp = _hf_token_logprobs(hf, ids[begin:end])
    nll -= lp[-new:].sum()
    count += new
    scored_to = end
    if end == len(ids):
      break
  assert got["tokens"] == count == len(ids) - 1
  assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
  assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)

  curve = against_context(ours, tokenizer, {"t": text, "short": "too short"}, [48, 96, 192], target_tokens=16)
  assert curve["skipped"] == ["short"]
  for j, c in enumerate([48, 96, 192]):
    want = -_hf_token_logprobs(hf, ids[-c:])[-16:].mean()
    assert curve["texts"][0]["nll"][j] == pytest.approx(want, rel=1e-4)


def test_scoring_and_routing_on_a_mesh_equal_one_device(models):
  from mixtral_jax.eval.batching import score_sequences
  from mixtral_jax.eval.loading import load_model

  _, ours, path = models
  sharded, _, mesh = load_model(path, mesh="data=2,expert=4")
  rng = np.random.default_rng(1)
  seqs = [rng.integers(3, 32000, n).tolist() for n in (30, 17, 9)]  # 3 rows: padded to the 2 x 4 batch shards
  for (lp, greedy), (lp1, greedy1) in zip(score_sequences(sharded, seqs, mesh=mesh), score_sequences(ours, seqs)):
    np.testing.assert_allclose(lp, lp1, atol=1e-4)
    assert (greedy == greedy1).all()
  for a, b in zip(router_logits(sharded, seqs, mesh=mesh), router_logits(ours, seqs)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_perplexity_cli_writes_json_and_plot(models, tmp_path):
  _, _, path = models
  text = tmp_path / "t.txt"
  text.write_text(open(json.__file__).read()[:1200])
  out = tmp_path / "ppl"
  assert cli(["eval", "perplexity", "--model", path, "--text", str(text), "--window", "64", "--context-lengths",
              "48,96", "--target-tokens", "16", "--out", str(out), "--no-progress"]) == 0
  result = json.loads((out / "perplexity.json").read_text())
  assert result["strided"]["window"] == 64 and result["strided"]["bits_per_byte"] > 0
  assert result["context"]["context_lengths"] == [48, 96] and len(result["context"]["mean_nll"]) == 2
  assert (out / "perplexity_context.png").stat().st_size > 0
  assert cli(["eval", "perplexity", "--model", path, "--text", str(text), "--context-lengths", "1k",
              "--out", str(tmp_path / "ppl2")]) == 2
