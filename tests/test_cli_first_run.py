"""What a new user sees: every subcommand's --help, the README's first command run as written (shortened),
and the CLI's answers to a refused run, a resumed run and a base model in `chat`.

- every command registered in ``mixtral_jax.cli.COMMANDS`` (including ones added later) has --help
  that exits 0, documents every argument, states each default at most once and ends with an example;
- the README's "Two commands" line, run in a subprocess on one device with a shortened
  ``--set train.steps`` and a cut-down model, prints plain log lines (no progress-bar carriage returns)
  when its output is a pipe, a held-out loss line at each evaluation, a summary that ends the run, and a
  generation that begins with the prompt; rerunning with more steps summarises the whole run;
- a run refused for its mesh leaves no workdir behind; the mesh error counts devices correctly;
- ``chat`` on a base model warns, and /quit ends the session.
"""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from mixtral_jax import cli
from processes import child_env

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# The README's tiny-pretrain, cut down to seconds: a small model on a few files, two steps, evaluated at each.
SHORT = ["train.steps=2", "train.eval_every=1", "train.eval_batches=1", "train.checkpoint_every=2",
         "train.peak_flops=1e11", "train.print_every=1", "data.max_files=12", "data.seq_len=32",
         "data.heldout_fraction=0.25", "loss.ce_chunk=16", "optimizer.warmup_steps=1",
         "model.overrides={hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, num_key_value_heads: 2}"]


# ------------------------------------------------------------------------------ --help of every command


def _help(name: str) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
    cli.main([name, "--help"])
  assert e.value.code == 0, name
  return out.getvalue()


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_help_documents_every_argument_once_and_ends_with_an_example(name):
  text = _help(name)
  _, parser = cli.command_parser(name)
  formatter = parser._get_formatter()
  for action in parser._actions:
    label = "/".join(action.option_strings) or action.dest
    assert action.help, f"{name}: {label} has no help"
    shown = formatter._expand_help(action)
    assert shown.lower().count("default") <= 1, f"{name}: {label} states its default twice: {shown!r}"
  flat = " ".join(text.split())
  assert not re.search(r"\(default: [^)]*\) \(default:", flat), flat
  last = text.strip().splitlines()[-1].strip()
  assert last.startswith(f"mixtral-jax {name}"), f"{name}: --help does not end with an example: {last!r}"
  assert "example" in text.lower()


def test_chat_help_says_how_to_leave():
  text = " ".join(_help("chat").split())
  assert "/exit" in text and "/quit" in text and "empty line" in text


# ------------------------------------------------------------------------------ the README's first command


def readme_first_command() -> list[list[str]]:
  """The commands of the README's first code block after "Two commands", `pip install` left out."""
  text = open(README).read()
  block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
  commands = [shlex.split(c) for c in block.replace("\\\n", " ").strip().split("&&")]
  commands = [c for c in commands if c[0] != "pip"]
  assert [c[:2] for c in commands] == [["mixtral-jax", "train"], ["mixtral-jax", "generate"]], commands
  return commands


def _run(argv: list[str], cwd, timeout=600) -> str:
  """``mixtral-jax ARGV`` in a one-device child with its output on a pipe (as in a log file). The children
  share a persistent compilation cache in ``cwd``, so the resumed run does not compile again."""
  env = child_env(JAX_COMPILATION_CACHE_DIR=str(cwd / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  p = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", *argv[1:]], cwd=cwd, env=env,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
  assert p.returncode == 0, p.stdout[-4000:]
  return p.stdout


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
  cwd = tmp_path_factory.mktemp("readme")
  train, gen = readme_first_command()
  sets = [a for s in SHORT for a in ("--set", s)]
  train_out = _run(train + sets, cwd)
  gen_out = _run(gen + ["--max-new-tokens", "8"], cwd)
  workdir = cwd / train[train.index("--workdir") + 1]
  return train, gen, train_out, gen_out, workdir, cwd


@pytest.mark.subprocess_cli
def test_readme_first_command_prints_plain_lines_and_held_out_loss(readme_run):
  out = readme_run[2]
  assert "\r" not in out, "a progress bar was drawn into a pipe"
  lines = out.splitlines()
  assert any(line.startswith("mixtral-jax train: ") for line in lines), out  # the header, whole, on its own line
  assert [line.split(":")[0] for line in lines if re.match(r"step \d+/2: loss ", line)] == ["step 1/2", "step 2/2"]
  evals = [line for line in lines if re.fullmatch(r"step \d+/2: held-out loss \d+\.\d+", line)]
  assert [e.split(":")[0] for e in evals] == ["step 1/2", "step 2/2"], out
  records = [json.loads(r) for r in open(readme_run[4] / "metrics.jsonl")]
  assert f"held-out loss {records[-1]['eval_loss']:.4f}" in evals[-1]
  summary = [line for line in lines if line.startswith("done: ")]
  assert summary and "held-out loss" in summary[-1] and lines[-1] == summary[-1], out


@pytest.mark.subprocess_cli
def test_readme_generate_echoes_the_prompt(readme_run):
  gen, out = readme_run[1], readme_run[3]
  prompt = gen[gen.index("--prompt") + 1]
  assert out.startswith(prompt), out
  assert re.search(r"\[0: \d+ tokens, finished by (eos|stop|length)\]", out), out


@pytest.mark.subprocess_cli
def test_resumed_run_summarises_the_whole_run(readme_run):
  train, workdir, cwd = readme_run[0], readme_run[4], readme_run[5]
  sets = [a for s in SHORT for a in ("--set", s)]
  out = _run(train + sets + ["--steps", "3"], cwd)
  records = {}
  for line in open(workdir / "metrics.jsonl"):
    r = json.loads(line)
    records[r["step"]] = r
  assert sorted(records) == [1, 2, 3]
  want = (f"done: step 3, loss {records[3]['loss']:.4f}, held-out loss {records[1]['eval_loss']:.4f} (step 1) "
          f"-> {records[3]['eval_loss']:.4f} (step 3)")
  assert want in out.splitlines()[-1], out


@pytest.mark.subprocess_cli
def test_chat_on_a_base_model_warns_and_quit_ends_it(readme_run, monkeypatch, capsys):
  workdir = readme_run[4]
  monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\nhello\n"))
  assert cli.main(["chat", "--model", str(workdir)]) == 0
  captured = capsys.readouterr()
  assert "does not look like an Instruct model" in captured.err
  assert captured.out == ""  # /quit was not sent to the model


# ------------------------------------------------------------------------------ refused runs


def test_refused_mesh_leaves_no_workdir(tmp_path, capsys):
  workdir = tmp_path / "x"
  assert cli.main(["train", "--workdir", str(workdir), "--mesh", "expert=16"]) == 2
  err = capsys.readouterr().err
  assert "has 16 devices but 8 are available" in err, err
  assert not workdir.exists()


def test_mesh_error_counts_one_device_in_the_singular():
  import jax  # noqa: PLC0415

  from mixtral_jax.sharding.mesh import make_mesh  # noqa: PLC0415
  with pytest.raises(ValueError, match=r"has 4 devices but 1 is available; make the axis sizes multiply to 1"):
    make_mesh("expert=4", devices=jax.devices()[:1])


def test_chat_model_evidence_heuristic(tmp_path):
  from mixtral_jax.generation_commands import instruct_evidence  # noqa: PLC0415
  base = tmp_path / "runs" / "tiny"
  (base / "checkpoints" / "300").mkdir(parents=True)
  (base / "train_config.yaml").write_text("data:\n  format: text\nmodel:\n  checkpoint: null\n")
  assert instruct_evidence(str(base)) is None and instruct_evidence(str(base / "checkpoints" / "300")) is None
  (base / "train_config.yaml").write_text("data:\n  format: chat\n")
  assert "chat" in instruct_evidence(str(base / "checkpoints" / "300"))
  assert instruct_evidence(str(tmp_path / "ckpt" / "Mixtral-8x7B-Instruct-v0.1")) is not None
  hf = tmp_path / "model"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"_name_or_path": "mistralai/Mixtral-8x22B-Instruct-v0.1"}))
  assert "config.json" in instruct_evidence(str(hf))


def test_summary_reads_the_whole_run_newest_record_of_a_step_winning(tmp_path):
  from mixtral_jax.train.metrics import read_metrics, summary  # noqa: PLC0415
  lines = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0, "eval_loss": 8.5}, {"step": 3, "loss": 7.9},
           {"step": 3, "loss": 7.5}, {"step": 4, "loss": 7.0, "eval_loss": 7.25}]  # killed after 3, resumed from 2
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo')
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3, 4] and records[2]["loss"] == 7.5
  assert summary(records) == "done: step 4, loss 7.0000, held-out loss 8.5000 (step 2) -> 7.2500 (step 4)"


def test_resuming_another_models_checkpoints_is_refused_before_tokenizing(tmp_path, capsys):
  import mixtral_jax  # noqa: PLC0415
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "100").mkdir(parents=True)
  mixtral_jax.get_config("tiny", hidden_size=64).save(str(workdir / "config.json"))
  assert cli.main(["train", "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert "holds checkpoints of a different model" in err and "hidden_size 64 there, 128 now" in err, err
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]  # no data/ tokenized
