"""Where a run's wall time goes (goodput), and a ``jax.profiler`` trace of chosen steps.

:class:`Goodput` splits the loop's wall time into

* ``compile``: tracing, lowering and XLA compilation, as JAX reports them through ``jax.monitoring``
  (events ``/jax/core/compile/*_duration``), whenever they happen (the first step, a recompile);
* ``data_wait``: waiting for the next batch and putting it on the devices;
* ``checkpoint``: time the loop is blocked by checkpoint saves (async saves block only for the copy
  off the devices, and at the final wait);
* ``eval``: held-out evaluation;
* ``compute``: the step itself, dispatch to the finished metrics on the host, less any compile time
  inside it (the step's results are fetched every step, so device time lands here, not in the next
  phase).

``goodput`` is compute / wall. Each step's record carries the seconds of each phase in that step
(``time/compute_s`` ...), and :meth:`Goodput.summary` the run's totals, as MLPerf-style goodput reports do.

:class:`ProfileWindow` starts ``jax.profiler.start_trace(workdir/profile)`` before step START and stops
it after step END of ``train.profile = "START:END"``; TensorBoard's profile plugin or Perfetto reads it.
"""

from __future__ import annotations

import contextlib
import os
import time

import jax

PHASES = ("compute", "data_wait", "checkpoint", "eval", "compile")
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class Goodput:
  """Accumulates seconds per phase; use :meth:`phase` around each part of a step, :meth:`step_record`
  after it. Compile seconds come from JAX's monitoring events and are taken out of ``compute``."""

  def __init__(self):
    self.total = dict.fromkeys(PHASES, 0.0)
    self.step = dict.fromkeys(PHASES, 0.0)
    self._compile = 0.0
    self._start = time.perf_counter()
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
      self._compile += duration

  @contextlib.contextmanager
  def phase(self, name: str):
    """Times the block as ``name``; compile time that happened inside it is moved to ``compile``."""
    compiled_before, t0 = self._compile, time.perf_counter()
    try:
      yield
    finally:
      elapsed = time.perf_counter() - t0
      compiled = min(self._compile - compiled_before, elapsed)
      self.step[name] += elapsed - compiled
      self.step["compile"] += compiled

  def step_record(self) -> dict:
    """This step's seconds per phase (``time/<phase>_s``), added to the totals; the step's counters reset."""
    record = {f"time/{p}_s": self.step[p] for p in PHASES}
    for p in PHASES:
      self.total[p] += self.step[p]
    self.step = dict.fromkeys(PHASES, 0.0)
    return record

  def summary(self) -> dict:
    """Totals per phase, ``other_s`` (wall time in none of them: logging, set-up between steps),
    ``wall_s`` and ``goodput`` (compute / wall)."""
    for p in PHASES:  # a phase timed after the last step_record
      self.total[p] += self.step[p]
    self.step = dict.fromkeys(PHASES, 0.0)
    wall = time.perf_counter() - self._start
    out = {f"{p}_s": self.total[p] for p in PHASES}
    out["other_s"] = max(wall - sum(self.total.values()), 0.0)
    out["wall_s"] = wall
    out["goodput"] = self.total["compute"] / wall if wall > 0 else 0.0
    return out

  def close(self) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_event)


def summary_line(s: dict) -> str:
  """'goodput 71.2%: compute 42.1 s, data wait 3.0 s, ...' for the run's log."""
  parts = ", ".join(f"{p.replace('_', ' ')} {s[p + '_s']:.1f} s" for p in PHASES)
  return f"goodput {100 * s['goodput']:.1f}% of {s['wall_s']:.1f} s wall: {parts}, other {s['other_s']:.1f} s"


def parse_profile(spec: str | None, steps: int) -> tuple[int, int] | None:
  """``"10:15"`` -> (10, 15): trace steps 10 to 15 inclusive; None or "" -> no trace. A malformed range,
  or one outside the run's steps 1..``steps``, is refused in one line."""
  if spec is None or str(spec).strip() in ("", "none", "None"):
    return None
  if isinstance(spec, int):  # YAML 1.1 reads an unquoted 10:15 as the base-60 number 615
    raise ValueError(f"train.profile: got the number {spec}; quote the range (train.profile='10:15'), "
                     f"since YAML reads an unquoted 10:15 as a base-60 number")
  parts = str(spec).split(":")
  try:
    start, end = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (None, None)
  except ValueError:
    start = end = None
  if start is None:
    raise ValueError(f"train.profile {spec!r}: expected START:END step numbers such as 10:15")
  if not 1 <= start <= end <= steps:
    raise ValueError(f"train.profile {spec!r} is outside the run's steps 1..{steps}; choose "
                     f"1 <= START <= END <= {steps}")
  return start, end


class ProfileWindow:
  """Starts a ``jax.profiler`` trace into ``workdir/profile`` before step START, stops it after step END."""

  def __init__(self, spec: str | None, steps: int, workdir: str):
    self.range = parse_profile(spec, steps)
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def before(self, step: int) -> None:
    if self.range and step == self.range[0]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int) -> None:
    if self.active and step >= self.range[1]:
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
