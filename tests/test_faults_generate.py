"""Generation's bad inputs (issue 23, items 6-7): sampling flags that are NaN, infinite or out of range,
text that is not UTF-8, a prompt longer than the context, and serve's port and sizes, each one line
before the model loads (the model path given does not exist, so a check that ran after loading would
name it instead). References: the flag named in the one line, the bytes given, and stdout left empty."""

import io
import math
import socket
import sys

import pytest

import mixtral_jax
from mixtral_jax import checkpoint
from mixtral_jax.cli import main as cli
from mixtral_jax.generate import generate
from mixtral_jax.sampling import Sampling
from mixtral_jax.text_input import check_text, first_undecodable, undecodable
from mixtral_jax.tokenizer import Tokenizer

NOWHERE = "/nonexistent/model"


def _one_line(capsys, *needles):
  out, err = capsys.readouterr()
  assert err.count("\n") == 1 and "Traceback" not in err, err
  for needle in needles:
    assert needle in err, (needle, err)
  return out, err


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-0.5"), ("--top-k", "-1"),
    ("--top-k", "0"), ("--top-p", "0"), ("--top-p", "nan"), ("--top-p", "1.5"), ("--max-new-tokens", "0"),
    ("--prefill-chunk", "3"),
])
def test_bad_sampling_flags_are_one_line_before_loading(flag, value, capsys):
  assert cli(["generate", "--model", NOWHERE, "--prompt", "hi", flag, value]) == 2
  _, err = _one_line(capsys, flag, value if value != "nan" else "nan")
  assert NOWHERE not in err  # refused before the model was looked for
  assert cli(["chat", "--model", NOWHERE, flag, value]) == 2
  _one_line(capsys, flag)


@pytest.mark.slow
def test_sampling_api_refuses_nonfinite_settings():
  for kwargs in ({"temperature": math.nan}, {"temperature": math.inf}, {"temperature": 1.0, "top_p": math.nan},
                 {"temperature": 1.0, "top_k": -1}, {"temperature": 1.0, "top_k": 2.5}):
    with pytest.raises(ValueError, match="temperature|top_p|top_k"):
      Sampling(**kwargs)
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", num_hidden_layers=1), seed=0)
  with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
    generate(model, [[1, 2, 3]], 4, temperature=math.nan)  # before anything compiles


def test_text_checks_name_the_byte_or_the_surrogate():
  assert undecodable("plain ascii, and ünïcode ✓") is None
  escaped = b"ab\xffc".decode("utf-8", "surrogateescape")  # what Python makes of a non-UTF-8 argument
  assert undecodable(escaped) == "byte 0xff at character 2 is not UTF-8"
  assert undecodable("x\ud800") == "a lone surrogate U+D800 at character 1 is not a Unicode character"
  assert first_undecodable([{"role": "user", "content": ["ok", {"text": "\udfff"}]}]).startswith("a lone")
  with pytest.raises(ValueError, match="the prompt is not valid UTF-8 text: byte 0xff"):
    check_text(escaped, "the prompt")
  with pytest.raises(ValueError, match="lone surrogate U\\+D800"):  # was a C++ cast RuntimeError
    Tokenizer.load("v1").encode("a\ud800")


@pytest.mark.parametrize("prompt, named", [
    (b"caf\xe9 au lait".decode("utf-8", "surrogateescape"), "byte 0xe9 at character 3"),  # Latin-1 bytes in argv
    ("half a pair \ud83d", "lone surrogate U+D83D"),
])
def test_undecodable_prompt_argument_is_one_line(prompt, named, capsys):
  assert cli(["generate", "--model", NOWHERE, "--prompt", prompt]) == 2
  out, _ = _one_line(capsys, "the prompt is not valid UTF-8 text", named)
  assert out == ""
  assert cli(["generate", "--model", NOWHERE, "--prompt", "fine", "--prompt", prompt]) == 2
  _one_line(capsys, "prompt 1 is not valid UTF-8 text")


def test_undecodable_stdin_is_one_line(monkeypatch, capsys):
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n")))
  assert cli(["generate", "--model", NOWHERE]) == 2
  _one_line(capsys, "the prompt on stdin is not valid UTF-8 text: byte 0xe9 at byte 3")


def test_prompt_over_the_context_is_not_echoed(tmp_path, capsys):
  cfg = mixtral_jax.get_config("tiny", num_hidden_layers=1, max_position_embeddings=64)
  path = checkpoint.save(mixtral_jax.create_model(cfg, seed=0), tmp_path / "tiny")
  prompt = "the quick brown fox jumps over the lazy dog " * 20  # ~200 tokens, the context is 64
  assert cli(["generate", "--model", str(path), "--tokenizer", "v1", "--prompt", prompt]) == 2
  out, err = capsys.readouterr()
  assert "longer than the model's context of 64" in err and err.count("\n") == 1, err
  assert "quick brown" not in out + err  # before: the whole prompt was echoed, then the error


def test_serve_checks_its_port_and_sizes_before_loading(capsys):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert cli(["serve", "--model", NOWHERE, "--port", str(port)]) == 2
    _, err = _one_line(capsys, f"cannot listen on 127.0.0.1:{port}", "another --port")
  for flag, value in (("--max-batch", "0"), ("--max-queue", "-1"), ("--prefill-chunk", "0"),
                      ("--max-context", "1")):
    assert cli(["serve", "--model", NOWHERE, "--port", str(port), flag, value]) == 2
    _one_line(capsys, f"{flag} must be >=")
  assert cli(["serve", "--model", NOWHERE, "--host", "no-such-host.invalid", "--port", str(port)]) == 2
  _one_line(capsys, "cannot be resolved")


CUDA_CHILD = ("import sys; from mixtral_jax.cli import quiet_cuda_plugin\n"  # as cli.main: before JAX loads
              "if sys.argv[1] != 'loud': quiet_cuda_plugin()\n"
              "import jax; print(jax.devices()[0].platform)\n"
              "if sys.argv[1] == 'plan':\n"  # plan's deviceless TPU devices, from libtpu with JAX on the CPU
              "  from mixtral_jax.train.plan import topology; print(len(topology.tpu_devices('v5p-8')))")


@pytest.mark.subprocess_cli
def test_cuda_plugin_traceback_is_silenced_without_a_gpu(child_env):
  import glob
  import importlib.util
  import subprocess
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    pytest.fail("this check needs JAX's CUDA plugin installed (the test extra installs it)")
  if glob.glob("/dev/nvidia[0-9]*"):
    pytest.skip("a host with a GPU: the traceback being silenced only happens without one")
  env = {k: v for k, v in child_env().items() if k != "JAX_PLATFORMS"}
  loud, quiet, plan = (subprocess.run([sys.executable, "-c", CUDA_CHILD, mode], env=env, capture_output=True,
                                      text=True, timeout=120) for mode in ("loud", "quiet", "plan"))
  assert "CUDA error 303" in loud.stderr  # the reference: what every command printed before
  assert quiet.returncode == 0 and quiet.stdout.strip() == "cpu" and "CUDA" not in quiet.stderr, quiet.stderr
  assert plan.returncode == 0 and plan.stdout.split() == ["cpu", "4"] and "CUDA" not in plan.stderr, plan.stderr
