"""eval/harness.py: our lm-eval adapter against lm-eval's own Hugging Face model on the same weights."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from mixtral_jax.eval.harness import HarnessLM, run_tasks, task_manager  # noqa: E402

pytestmark = pytest.mark.slow

TASKS = ["mixtral_jax_demo_choice", "mixtral_jax_demo_rolling", "mixtral_jax_demo_generate"]


@pytest.fixture(scope="module")
def checkpoint(hf_model, save_hf_with_tokenizer, tmp_path_factory):
  """A random tiny HF Mixtral with the real v1 vocabulary and both tokenizers beside it."""
  return save_hf_with_tokenizer(hf_model(seed=11, vocab_size=32000, num_hidden_layers=2),
                                tmp_path_factory.mktemp("harness") / "model")


def _by_doc(results, task):
  return {s["doc_id"]: s["filtered_resps"] for s in results["samples"][task]}


def test_adapter_equals_lm_eval_hf_model(checkpoint):
  import lm_eval
  from lm_eval.models.huggingface import HFLM

  ref = lm_eval.simple_evaluate(model=HFLM(pretrained=checkpoint, dtype="float32", batch_size=4, device="cpu"),
                                tasks=TASKS, task_manager=task_manager(TASKS), log_samples=True, limit=4)
  ours = run_tasks(HarnessLM(checkpoint, batch_size=4, progress=False), TASKS, limit=4, log_samples=True)
  choice_ref, choice = _by_doc(ref, TASKS[0]), _by_doc(ours, TASKS[0])
  assert sorted(choice) == sorted(choice_ref) and len(choice) == 4
  n_greedy = 0
  for doc, pairs in choice.items():
    want = choice_ref[doc]
    assert len(pairs) == len(want)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(pairs, want):
      assert abs(float(ll) - float(ll_ref)) <= 1e-4, (doc, ll, ll_ref)
      assert bool(greedy) == bool(greedy_ref)
      n_greedy += bool(greedy)
  rolling_ref, rolling = _by_doc(ref, TASKS[1]), _by_doc(ours, TASKS[1])
  for doc, got in rolling.items():
    np.testing.assert_allclose(np.ravel(got).astype(float), np.ravel(rolling_ref[doc]).astype(float), atol=1e-4, rtol=1e-6)
  assert _by_doc(ours, TASKS[2]) == _by_doc(ref, TASKS[2])
  for task in TASKS:  # and so the aggregated metrics agree too
    for metric, value in ref["results"][task].items():
      if isinstance(value, float):
        assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, metric)


def test_cli_writes_results_and_table(checkpoint, tmp_path, capsys):
  import json

  from mixtral_jax.cli import main as cli

  out = tmp_path / "harness"
  assert cli(["eval", "harness", "--model", checkpoint, "--tasks", "mixtral_jax_demo_choice", "--limit", "3",
              "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
  res = json.loads((out / "results.json").read_text())
  assert res["results"]["mixtral_jax_demo_choice"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
  assert "mixtral_jax_demo_choice" in (out / "results.md").read_text() and "acc" in capsys.readouterr().out
  assert cli(["eval", "harness", "--model", checkpoint, "--tasks", "mixtral_jax_demo_choise", "--out",
              str(tmp_path / "h2")]) == 2
  assert "close: mixtral_jax_demo_choice" in capsys.readouterr().err
