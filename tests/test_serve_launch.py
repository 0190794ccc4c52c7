"""``mixtral_jax.inference.launch``: the start-and-wait helper that the server tests (``processes.serving``)
and ``benchmarks/serve.py`` share. Its success path runs under every live-server test; here, its two
failures, each naming what the child printed last, and the echo of the child's output."""

import io

import pytest

from mixtral_jax.inference.launch import ServerExited, launch
from processes import child_env


@pytest.mark.slow
def test_a_child_that_exits_raises_with_its_last_output(tmp_path):
  echo = io.StringIO()
  with pytest.raises(ServerExited) as e:
    launch(str(tmp_path / "nowhere"), "--max-context", "64", env=child_env(), startup_s=120, echo=echo)
  msg, line = str(e.value), f"mixtral-jax serve: error: {tmp_path / 'nowhere'} does not exist"
  assert msg.startswith("mixtral-jax serve exited with code 2 before answering /health"), msg
  assert line in msg and line in echo.getvalue(), (msg, echo.getvalue())  # serve's own one-line error


def test_a_child_not_up_in_time_is_killed_and_named(tmp_path):
  with pytest.raises(TimeoutError) as e:
    launch(str(tmp_path / "nowhere"), env=child_env(), startup_s=0.01)
  assert "did not answer http://127.0.0.1:" in str(e.value) and "within 0.01 s (killed)" in str(e.value)
