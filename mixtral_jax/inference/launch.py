"""Start ``mixtral-jax serve`` as a child process and wait until it is ready.

  with launch("runs/tiny", "--max-batch", "4", env=env) as server:   # returns once /health answers 200
    openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")...

The child's stdout and stderr (one stream) are read by a daemon thread all along, so a chatty server
never blocks on a full pipe; the last lines are kept (and echoed to ``echo`` if given). Waiting polls
``GET /health`` (it answers only once the model is loaded and compiled, see
:mod:`mixtral_jax.inference.commands`). A child that exits first raises :class:`ServerExited`, and
one that is not up within ``startup_s`` is killed and raises ``TimeoutError``; both messages carry the
child's last output lines, where its one-line error is. Standard library only (no HTTP client needed).
"""

from __future__ import annotations

import collections
import dataclasses
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

TAIL_LINES = 20


class ServerExited(RuntimeError):
  """The server process ended before answering /health."""


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port on ``host`` that nothing listens on now (another process may take it before the child)."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Server:
  """A running ``mixtral-jax serve`` child: its process, base URL and last output lines."""
  proc: subprocess.Popen
  url: str
  tail: collections.deque
  reader: threading.Thread

  def output(self) -> str:
    """The child's last output lines (waiting a moment for the reader to reach the end of the pipe)."""
    self.reader.join(timeout=5 if self.proc.poll() is not None else 0)
    return "\n".join(self.tail)

  def stop(self, timeout: float = 30) -> None:
    """SIGTERM (uvicorn shuts down and the engine stops), then SIGKILL after ``timeout`` seconds."""
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()

  def __enter__(self) -> "Server":
    return self

  def __exit__(self, *_exc) -> None:
    self.stop()


def launch(model_path: str, *args: str, host: str = "127.0.0.1", port: int | None = None, env=None,
           startup_s: float = 600, echo=None) -> Server:
  """Runs ``python -m mixtral_jax serve --model MODEL_PATH --host HOST --port PORT ARGS`` (a free port when
  none is given) and returns once ``/health`` answers 200; see the module docstring for failures."""
  port = port or free_port(host)
  proc = subprocess.Popen([sys.executable, "-m", "mixtral_jax", "serve", "--model", model_path, "--host", host,
                           "--port", str(port), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace")
  tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
  reader = threading.Thread(target=_read, args=(proc.stdout, tail, echo), name="serve-output", daemon=True)
  reader.start()
  connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
  server = Server(proc, f"http://{connect}:{port}", tail, reader)
  try:
    _wait_healthy(server, startup_s)
  except BaseException:
    server.stop(timeout=10)
    raise
  return server


def _wait_healthy(server: Server, startup_s: float) -> None:
  """Polls /health every 0.25 s until 200, the child's exit, or ``startup_s``."""
  deadline = time.monotonic() + startup_s
  while True:
    try:
      with urllib.request.urlopen(f"{server.url}/health", timeout=1) as r:
        if r.status == 200:
          return
    except (urllib.error.URLError, OSError):
      pass  # not listening yet (connection refused), or still starting
    code = server.proc.poll()
    if code is not None:
      raise ServerExited(f"mixtral-jax serve exited with code {code} before answering /health; its last output:\n"
                         f"{server.output()}")
    if time.monotonic() > deadline:
      server.stop(timeout=10)
      raise TimeoutError(f"mixtral-jax serve did not answer {server.url}/health within {startup_s:g} s (killed); "
                         f"its last output:\n{server.output()}")
    time.sleep(0.25)


def _read(stream, tail: collections.deque, echo) -> None:
  """Keeps the last lines of the child's output (and echoes them) until the pipe closes."""
  for line in stream:
    tail.append(line.rstrip("\n"))
    if echo is not None:
      echo.write(line)
      echo.flush()
  stream.close()
