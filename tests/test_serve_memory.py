"""The paged KV cache's default budget (``mixtral_jax.inference.memory``) against hand computations in
NumPy: on devices that report memory, utilization x limit - in use on the tightest device; on CPU, the
fixed rows' max_batch x max_context tokens (at least one max_context request plus the null page); too
little memory is one line with the numbers and the fixes. Also the serve flags around it (one-line
errors, in process, before anything loads) and the refusal of ``--adapter`` on an expert-parallel mesh."""

import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import cli
from mixtral_jax.checkpoint import save
from mixtral_jax.inference.memory import DeviceMemory, default_cache_bytes, device_memory
from mixtral_jax.inference.pages import pages_for_budget
from processes import free_port

GiB = 2**30
# 8x7B's cache: 32 layers, 8 kv heads of 128, bf16
SHAPE = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2)
PER_TOKEN = 2 * 32 * 8 * 128 * 2  # what the engine's pages.bytes_per_token gives; checked below by NumPy


def per_token_by_hand(num_layers, num_kv_heads, head_dim, dtype_bytes):
  k_LKH = np.zeros((num_layers, num_kv_heads, head_dim), np.dtype(f"f{dtype_bytes}"))
  return 2 * k_LKH.nbytes  # keys and values


def test_per_token_is_keys_and_values_of_every_layer():
  from mixtral_jax.inference.pages import bytes_per_token  # noqa: PLC0415

  assert bytes_per_token(**SHAPE) == per_token_by_hand(**SHAPE) == PER_TOKEN == 128 * 1024


def test_devices_with_memory_take_utilization_of_the_limit_less_use_on_the_tightest():
  memory = [DeviceMemory("gpu:0", 80 * GiB, 47 * GiB), DeviceMemory("gpu:1", 80 * GiB, 49 * GiB),
            DeviceMemory("gpu:2", 96 * GiB, 49 * GiB)]
  got = default_cache_bytes(memory, utilization=0.9, max_batch=16, max_context=32768, page_size=64, per_token=PER_TOKEN)
  want = min(np.float64(0.9) * m.limit - m.in_use for m in memory)  # gpu:1: 72 - 49 = 23 GiB
  assert got.bytes == int(want) and "gpu:1" in got.how and "0.9" in got.how
  tokens = (pages_for_budget(got.gib, max_context=32768, page_size=64, **SHAPE) - 1) * 64
  assert tokens == (int(want) // (64 * per_token_by_hand(**SHAPE)) - 1) * 64 == 188_352  # 23 GiB at 128 KiB/token


def test_cpu_takes_what_fixed_rows_reserve():
  got = default_cache_bytes(None, utilization=0.9, max_batch=16, max_context=2048, page_size=64, per_token=PER_TOKEN)
  assert got.bytes == 16 * 2048 * per_token_by_hand(**SHAPE) and "16 x 2048" in got.how
  # The paged pool then holds no more than the fixed rows' tokens (one page goes to the null page).
  pages = pages_for_budget(got.gib, max_context=2048, page_size=64, **SHAPE)
  assert pages * 64 == 16 * 2048


def test_cpu_with_one_row_still_holds_one_full_request():
  """max_batch 1: the fixed row's tokens are a page short of one request plus the null page."""
  got = default_cache_bytes(None, utilization=0.9, max_batch=1, max_context=100, page_size=64, per_token=PER_TOKEN)
  assert got.bytes == (2 + 1) * 64 * per_token_by_hand(**SHAPE)  # ceil(100 / 64) pages + the null page
  assert pages_for_budget(got.gib, max_context=100, page_size=64, **SHAPE) == 3


def test_too_little_memory_is_one_line_with_the_numbers_and_the_fixes():
  memory = [DeviceMemory("gpu:0", 80 * GiB, 70 * GiB)]  # 72 - 70 = 2 GiB; 32768 tokens need 4 GiB + a page
  with pytest.raises(ValueError) as e:
    default_cache_bytes(memory, utilization=0.9, max_batch=8, max_context=32768, page_size=64, per_token=PER_TOKEN)
  msg = str(e.value)
  assert "\n" not in msg
  for part in ("2.000 GiB", "0.9 x 80.00 GiB limit - 70.00 GiB in use on gpu:0", "--max-context 32768",
               "4.008 GiB", "512 pages of 64 tokens", "128 KiB per token", "raise --memory-utilization",
               "lower --max-context"):
    assert part in msg, (part, msg)


class FakeDevice:
  def __init__(self, i, stats):
    self.platform, self.id, self.stats = "gpu", i, stats

  def memory_stats(self):
    return self.stats


def test_device_memory_reads_memory_stats_and_none_on_cpu():
  import jax  # noqa: PLC0415

  assert device_memory(jax.devices()[:2]) is None  # CPU reports no memory statistics
  fake = [FakeDevice(0, {"bytes_limit": 10, "bytes_in_use": 3}), FakeDevice(1, {"bytes_limit": 12})]
  assert device_memory(fake) == [DeviceMemory("gpu:0", 10, 3), DeviceMemory("gpu:1", 12, 0)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", num_hidden_layers=1), seed=0)
  return str(save(model, tmp_path_factory.mktemp("memory") / "tiny"))


def _serve_error(capsys, *argv):
  rc = cli.main(["serve", "--port", str(free_port()), *argv])
  err = capsys.readouterr().err.strip()
  assert "\n" not in err, err
  return rc, err


@pytest.mark.parametrize("flags, words", [
    (("--fixed-rows", "--adapter", "a=/nowhere"), "--adapter needs the paged KV cache, not with --fixed-rows"),
    (("--fixed-rows", "--kv-cache-gib", "1", "--page-size", "16"), "--kv-cache-gib, --page-size need the paged"),
    (("--kv-cache-gib", "1", "--memory-utilization", "0.5"), "pass one of them"),
    (("--memory-utilization", "1.5"), "--memory-utilization must be in (0, 1], got 1.5"),
    (("--kv-cache-gib", "0"), "--kv-cache-gib must be > 0"),
])
def test_bad_cache_flags_fail_before_loading(capsys, flags, words):
  rc, err = _serve_error(capsys, "--model", "/nowhere", *flags)
  assert rc == 2 and words in err, err


def test_adapter_on_an_expert_mesh_is_refused_in_one_line(capsys):
  """Per-row adapters run in the single-device expert kernels (moe.py refuses them at trace time on an
  expert-parallel mesh); serve refuses the flags before loading, naming the mesh."""
  rc, err = _serve_error(capsys, "--model", "/nowhere", "--mesh", "expert=4,data=-1", "--adapter", "a=/nowhere")
  assert rc == 2 and "--adapter is not served on a mesh with an expert axis" in err and "expert=4" in err, err
  rc, err = _serve_error(capsys, "--model", "/nowhere", "--mesh", "data=-1,expert=1", "--adapter", "a=/nowhere")
  assert rc == 2 and "expert axis" not in err and "/nowhere does not exist" in err, err  # the adapter check is next


@pytest.mark.slow
def test_memory_utilization_on_cpu_is_refused(capsys, tiny_path):
  rc, err = _serve_error(capsys, "--model", tiny_path, "--memory-utilization", "0.5", "--max-context", "64")
  assert rc == 2 and "--memory-utilization needs devices that report their memory" in err, err


def test_plan_generate_says_what_serve_would_take():
  """plan --generate's paged-cache line also gives serve's default on that device: 0.9 x 70 GiB - 44 GiB
  of parameters = 19 GiB, in whole 64-token pages of 128 KiB tokens, the null page left out."""
  from mixtral_jax.train.plan.serving import paged_cache_line  # noqa: PLC0415

  out = {"kv_cache_bytes": 8 * 8192 * PER_TOKEN, "param_bytes": 44 * GiB,
         "prefill": {"temp_bytes": GiB}, "decode": {"temp_bytes": GiB // 2}}
  line = paged_cache_line(out, ("70 GiB", 70.0), 8 * 8192)
  room = np.floor(np.float64(0.9) * 70 * GiB - 44 * GiB)
  tokens = (int(room) // (PER_TOKEN * 64) - 1) * 64
  assert f"serve's default (0.9 x 70 GiB - the parameters, --memory-utilization) takes {room / GiB:.1f} GiB, " \
         f"{tokens:,} tokens" in line, line
  out["param_bytes"] = 64 * GiB  # 63 - 64 < 0
  assert "leaves no room for the cache" in paged_cache_line(out, ("70 GiB", 70.0), 8 * 8192)


def test_serve_takes_the_fixed_rows_memory_on_cpu_and_the_flags_otherwise():
  """``serve``'s cache size (commands.cache_gib) for a tiny float32 model on CPU, against the hand count
  of 6 x 64 tokens x 2 (K, V) x L x K x H x 4 bytes; --kv-cache-gib wins; --fixed-rows gives None."""
  import argparse  # noqa: PLC0415

  from mixtral_jax.inference.commands import cache_gib, serve_parser  # noqa: PLC0415

  model = mixtral_jax.create_model(mixtral_jax.get_config("tiny", num_hidden_layers=1, dtype="float32"), seed=0)
  cfg = model.cfg
  parser = argparse.ArgumentParser()
  serve_parser(parser)
  args = parser.parse_args(["--model", "m", "--max-batch", "6", "--max-context", "64"])
  gib, how = cache_gib(args, model)
  k_LKH = np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size), np.float32)
  assert gib * GiB == 6 * 64 * 2 * k_LKH.nbytes and "6 x 64" in how
  assert cache_gib(parser.parse_args(["--model", "m", "--kv-cache-gib", "0.5"]), model)[0] == 0.5
  assert cache_gib(parser.parse_args(["--model", "m", "--fixed-rows"]), model)[0] is None


@pytest.mark.slow
def test_int8_weights_on_the_paged_default_equal_fixed_rows(tiny_path):
  """``serve --quantize int8`` keeps working now that it runs paged by default: greedy tokens of an int8
  model equal the fixed-row engine's (the previous default) on the same weights."""
  from mixtral_jax.inference.engine import Engine  # noqa: PLC0415
  from mixtral_jax.inference.requests import Request  # noqa: PLC0415

  outs = []
  for gib in (None, 0.01):
    engine = Engine(mixtral_jax.from_pretrained(tiny_path, quantize="int8"), max_batch=2, max_context=64,
                    prefill_chunk=16, kv_cache_gib=gib)
    got = []
    engine.submit(Request([1, 50, 60, 70, 80], 8, lambda t, _d: got.append(t), lambda *_: None))
    engine.run_until_done()
    outs.append(got)
  assert len(outs[0]) == 8 and outs[0] == outs[1]
