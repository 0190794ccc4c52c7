"""Child processes for the tests: several Python processes for the multi-process tests (jax.distributed
over 127.0.0.1), and a `mixtral-jax serve` on loopback for the server tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (for the jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
  """This environment without XLA_FLAGS (each child sets its own device count), plus ``extra``."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(extra)
  return env


def run_all(argvs: list[list[str]], *, env: dict[str, str], timeout: float) -> list[str]:
  """Runs ``python ARGV`` for each argv at once; returns each one's combined output. Fails the test,
  showing the outputs, if any process times out or exits non-zero."""
  procs = [subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for argv in argvs]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("processes timed out:\n" + "\n----\n".join(logs))
  if any(p.returncode != 0 for p in procs):
    pytest.fail("a process failed:\n" + "\n----\n".join(logs)[-6000:])
  return logs


@contextlib.contextmanager
def serving(model_path: str, *args: str, startup_s: float = 300):
  """Runs ``mixtral-jax serve --model MODEL_PATH ARGS`` on a free loopback port
  (:func:`mixtral_jax.inference.launch.launch`) and yields its base URL once ``/health`` answers 200;
  fails the test, with the server's last output lines, if it exits or does not come up within
  ``startup_s``. Terminates the server afterwards."""
  from mixtral_jax.inference.launch import ServerExited, launch  # noqa: PLC0415

  try:
    server = launch(model_path, *args, env=child_env(), startup_s=startup_s)
  except (ServerExited, TimeoutError) as e:
    pytest.fail(f"the server did not start: {e}")
  with server:
    yield server.url
