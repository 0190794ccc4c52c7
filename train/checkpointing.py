"""Training checkpoints: Orbax ``CheckpointManager`` with asynchronous, atomic saves, keeping the last N.

Layout: ``WORKDIR/checkpoints/<step>/`` with the items
  ``params``     the model parameters, the tree ``nnx.state(model, nnx.Param).to_pure_dict()`` (with
                 ``WORKDIR/config.json``, this is a model checkpoint that ``from_pretrained`` and
                 ``mixtral-jax export`` read),
  ``opt_state``  the optax state,
  ``progress``   {"step", "rng"},
  ``data``       the data iterator state (JSON).

Orbax writes a step into a temporary directory and renames it when every item is complete, so a process
killed mid-save leaves the previous steps intact. Once a save has finished, its ``params`` get a digest
file, ``<step>/params.digests.json`` (``mixtral_jax.checkpoint.integrity``: an XXH3-64 per layer of every
array, read back from disk). Resuming takes the newest step that verifies (checksums, no NaN/Inf) and
restores; a step that does not is reported, and once an older step has restored it is moved aside to
``checkpoints/corrupt-<step>``, so the run continues from that good one and later saves the step again
without conflict. If checkpoints
exist but none restores the run stops, naming them, instead of starting again from step 0
(``--restart`` moves them aside explicitly).

A run stopped by SIGTERM after saving exits with :data:`PREEMPTED_EXIT_CODE`, which a scheduler can
read as "preempted, rerun me to resume" (0 would read as "finished").
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
import orbax.checkpoint as ocp

from mixtral_jax.checkpoint import integrity

log = logging.getLogger("mixtral_jax.train")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure; the user is invited to retry"
CORRUPT_PREFIX = "corrupt-"


class CheckpointError(RuntimeError):
  pass


def barrier(name: str, timeout_s: float) -> None:
  """Waits until every process reaches ``name``; after ``timeout_s`` raises, naming the processes
  that never arrived. A no-op with one process."""
  n = jax.process_count()
  if n == 1:
    return
  from jax._src import distributed  # noqa: PLC0415 - the coordination service client JAX itself uses
  client = distributed.global_state.client
  me = jax.process_index()
  client.key_value_set(f"mixtral_jax/barrier/{name}/{me}", "1")
  deadline = time.monotonic() + timeout_s
  missing = []
  for other in range(n):
    remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
    try:
      client.blocking_key_value_get(f"mixtral_jax/barrier/{name}/{other}", remaining_ms)
    except Exception:  # noqa: BLE001 - the client raises a generic error on timeout
      missing.append(other)
  if missing:
    raise TimeoutError(f"barrier {name!r}: process(es) {missing} of {n} did not arrive within {timeout_s:.0f}s "
                       f"(this is process {me}); check their logs, or raise train.barrier_timeout_s")


class Checkpointer:
  def __init__(self, directory: str, *, keep: int, async_save: bool, timeout_s: float = 300.0):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(timeout_secs=int(timeout_s)))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("params", "opt_state", "progress", "data"))
    self._saving = None  # the step of the newest save started
    self._sealed: set[int] = set()  # steps whose params digest exists

  def save(self, state, data_state: dict, *, force: bool = False) -> None:
    """Starts saving ``state`` at its step (returns once the arrays are copied off the devices)."""
    step = int(state.step)
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
        progress=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=ocp.args.JsonSave(data_state))
    with self._surfacing(self._saving):  # Orbax's save would wait for the previous one too
      self.manager.wait_until_finished()
    self._saving = step
    with self._surfacing(step):
      self.manager.save(step, args=args, force=force)

  def check_for_errors(self) -> None:
    """Raises the error of a background save that has failed (called every step, so it surfaces at the
    first step after that save ended).

    ``CheckpointManager.check_for_errors`` misses it: Orbax's own finalize thread takes the error off
    the async checkpointer, where that call looks, logs it and keeps it for ``wait_until_finished``.
    Once no save is in progress, that call returns at once, raising the kept error, so it is made
    then: it never blocks a step, nor takes the error from a finalize thread still running (which
    would then finalize the failed step and delete old checkpoints)."""
    with self._surfacing(self._saving):
      if not self.manager.is_saving_in_progress():
        self.manager.wait_until_finished()
        self.seal_finished()

  def wait(self) -> None:
    with self._surfacing(self._saving):
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    self.seal_finished()

  def seal_finished(self) -> None:
    """Writes the params digest of every finished step that lacks one (process 0; the others' shares of
    the arrays are on the same storage). Called only when no save is in progress."""
    if jax.process_index() != 0:
      return
    for step in self.manager.all_steps():
      if step in self._sealed:
        continue
      params = os.path.join(self.directory, str(step), "params")
      if os.path.isdir(params) and not integrity.has_digests(params):
        integrity.seal(params)
      self._sealed.add(step)

  @contextlib.contextmanager
  def _surfacing(self, step: int | None):
    """Turns an error of the save of ``step`` (in the background or not) into a CheckpointError."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - whatever the storage raised
      kept = sorted(s for s in self.manager.all_steps() if s != step)
      raise CheckpointError(
          f"the checkpoint save of step {step} in {self.directory} failed ({type(e).__name__}: {e}); the "
          f"checkpoints of steps {kept} are kept. Fix the cause, then rerun the same command to resume") from e

  def close(self) -> None:
    self.manager.close()

  def leftovers(self) -> list[str]:
    """Entries of the checkpoint directory that look like checkpoints (complete or not, or moved aside as
    corrupt): a run that finds these but restores none stops instead of starting from step 0."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(e for e in os.listdir(self.directory)
                  if e.split(".")[0].isdigit() or e.startswith(CORRUPT_PREFIX))

  def move_aside(self, step: int) -> str:
    """Renames an unreadable step to ``corrupt-<step>`` (kept for inspection, never loaded or counted
    again) and makes the manager forget it, so the step can be saved afresh. Returns the new path."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}")
    n = 1
    while os.path.lexists(dst):
      n += 1
      dst = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}.{n}")
    if jax.process_index() == 0 and os.path.lexists(src):
      os.rename(src, dst)
    barrier(f"corrupt-{step}", 300.0)
    self.manager.reload()
    return dst

  def restore_latest(self, abstract_state):
    """(state, data_state) from the newest step that restores, or None when there is no checkpoint.

    ``abstract_state`` is a TrainState of ShapeDtypeStructs with shardings on the concrete mesh."""
    from .step import TrainState  # noqa: PLC0415 - avoids a cycle through step's imports at load time
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        integrity.verify(os.path.join(self.directory, str(step), "params"))
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            progress=ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng}),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any unreadable step is reported, then an older one tried
        failures.append((step, f"step {step}: {type(e).__name__}: {str(e)[:300]}"))
        log.warning("checkpoint step %d in %s cannot be restored (%s); trying an older one", step,
                    self.directory, e)
        continue
      self._sealed.add(step)
      if failures:  # only now, with a good step in hand: the unreadable newer ones go aside
        moved = [self.move_aside(bad) for bad, _ in failures]
        log.warning("resumed from step %d; newer checkpoints were unreadable and are moved aside to %s: %s", step,
                    ", ".join(moved), "; ".join(m for _, m in failures))
      state = TrainState(out.params, out.opt_state, out.progress["step"], out.progress["rng"])
      return state, dict(out.data)
    found = self.leftovers()
    if found:
      detail = "; ".join(m for _, m in failures) if failures else "no complete checkpoint among them"
      raise CheckpointError(
          f"{self.directory} holds checkpoints {found} but none can be restored ({detail}). Not starting "
          "from step 0 silently: fix or remove them, use a new --workdir, or pass --restart to move them aside")
    return None
