"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere; the shared fixtures; the
test tiers.

Shared fixtures: the Hugging Face references of ``reference.py`` (``hf_model``, ``save_hf``, ``hf_logits``,
``save_hf_with_tokenizer``: random tiny transformers models and their logits) and the process helpers of
``processes.py`` (``child_env``, ``free_port``). Tests take them as fixture arguments. Module-level
constants (``TINY``, ``VARIANTS``, used in parametrisations and module configs, where no fixture can
reach) import from ``reference``; setup.cfg puts tests/ on the path (``pythonpath``), so that import does
not depend on the rootdir, the working directory or the import mode.

Tiers: the markers are registered in setup.cfg; see ``pytest_collection_modifyitems`` below.
"""

import gc
import os
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One on-disk compilation cache for the workers and every child process (CLI runs, two-process tests):
# programs that several of them compile (the tiny model's forward, train step, decode) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mixtral-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import processes  # noqa: E402 - tests/ helpers, on the path through setup.cfg's pythonpath
import pytest  # noqa: E402
import reference  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices; import jax only after conftest"


def _memory_maps() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


def _map_limit() -> int:
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read())
  except (OSError, ValueError):
    return 65_530  # Linux's default


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drops every compiled program after a test module once the process holds over half the memory
  mappings the kernel allows. XLA:CPU maps each executable's machine code into about three memory
  mappings, and JAX keeps every executable it compiled while the process lives: one pytest process
  compiling the whole suite (~8,000 programs) reached Linux's default ``vm.max_map_count`` (65,530)
  and segfaulted inside the compiler (CI, in test_model after 457 tests). Clearing after every module
  worked (peak 16,488 mappings) but made each module recompile the programs it shares with earlier
  ones; clearing only past half the limit keeps that reuse and stays below the limit by more than the
  largest module's share."""
  yield
  maps = _memory_maps()
  _PEAK_MAPS[0] = max(_PEAK_MAPS[0], maps)
  if maps > _map_limit() // 2:
    jax.clear_caches()
    gc.collect()


_PEAK_MAPS = [0]


def pytest_sessionfinish(session):
  """An xdist worker hands its peak to the controller, which prints the largest (below)."""
  if hasattr(session.config, "workeroutput"):
    session.config.workeroutput["peak_maps"] = _PEAK_MAPS[0]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  _PEAK_MAPS[0] = max(_PEAK_MAPS[0], int(getattr(node, "workeroutput", {}).get("peak_maps", 0)))


def pytest_terminal_summary(terminalreporter):
  """Reports the peak count of memory mappings at a module's end (per process: with xdist, the largest
  worker's), so a suite creeping back toward the limit shows in CI's log."""
  if _PEAK_MAPS[0]:
    terminalreporter.write_line(f"memory mappings: peak {_PEAK_MAPS[0]} at a module's end "
                                "(Linux's default vm.max_map_count is 65,530)")


@pytest.fixture(scope="session")
def hf_model():
  """``hf_model(seed=0, router_scale=20.0, **config overrides)``: a random tiny ``MixtralForCausalLM``."""
  return reference.hf_model


@pytest.fixture(scope="session")
def save_hf():
  """``save_hf(model, path, shard_size=None, dtype="float32")``: ``save_pretrained`` as safetensors."""
  return reference.save_hf


@pytest.fixture(scope="session")
def save_hf_with_tokenizer():
  """``save_hf_with_tokenizer(model, path)``: ``save_hf`` plus the v1 tokenizer, sentencepiece and HF."""
  return reference.save_hf_with_tokenizer


@pytest.fixture(scope="session")
def hf_logits():
  """``hf_logits(model, ids, attention_mask=None)``: (logits [B,T,V], router logits [L,B*T,E])."""
  return reference.hf_logits


@pytest.fixture(scope="session")
def child_env():
  """``child_env(**extra)``: this environment for a child process, without the 8-device XLA_FLAGS."""
  return processes.child_env


@pytest.fixture(scope="session")
def free_port():
  """``free_port()``: a TCP port on 127.0.0.1 nothing listens on (a jax.distributed coordinator's)."""
  return processes.free_port


@pytest.fixture(scope="session")
def run_all():
  """``run_all(argvs, env=, timeout=)``: runs ``python ARGV`` for each at once; fails the test on an error."""
  return processes.run_all


_IMPLY_SLOW = ("multiprocess", "subprocess_cli", "libtpu")


def pytest_collection_modifyitems(config, items):
  """Every multiprocess, subprocess_cli or libtpu test is also ``slow``: each starts processes or a TPU
  compiler, so none belongs in the inner loop (``-m "not slow"``) even when its own body is short."""
  for item in items:
    if any(item.get_closest_marker(m) for m in _IMPLY_SLOW) and not item.get_closest_marker("slow"):
      item.add_marker(pytest.mark.slow)
