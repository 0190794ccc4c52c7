"""What the weight checks of issue 23 cost: convert and from_pretrained with and without them.

Builds a random model (float32), saves it as our Orbax checkpoint and exports it to Hugging Face
safetensors, then times, alternating within each repeat (medians over ``--repeats``):

  convert          HF -> Orbax: NaN/Inf count of every block + XXH3-64 digests, against both disabled
  load hf          from_pretrained(HF dir): NaN/Inf count of every layer slice on its device, against it
                   disabled
  load orbax       from_pretrained(Orbax): read layer by layer through TensorStore with the next array's
                   read in flight, each layer's digest checked and its NaN/Inf counted on the device,
                   against the previous path: Orbax's whole-tree restore (``orbax_io.restore_params``),
                   no checks

"Disabled" (convert, load hf) patches ``integrity.count_nonfinite`` to return 0, ``Digests.add`` and
``DeviceFiniteCheck.add`` to do nothing and ``integrity.verify`` to return at once: the code path of the
implementation before the checks.

  python benchmarks/load_checks.py --layers 4 --hidden 512 --ffn 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time

import mixtral_jax
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint import integrity


@contextlib.contextmanager
def checks_disabled():
  saved = integrity.count_nonfinite, integrity.Digests.add, integrity.verify, integrity.DeviceFiniteCheck.add
  integrity.count_nonfinite = lambda block: 0
  integrity.Digests.add = lambda self, key, i, data: None
  integrity.verify = lambda *a, **k: True
  integrity.DeviceFiniteCheck.add = lambda self, name, array, read_again: array
  try:
    yield
  finally:
    integrity.count_nonfinite, integrity.Digests.add, integrity.verify, integrity.DeviceFiniteCheck.add = saved


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--ffn", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  cfg = mixtral_jax.get_config("tiny", num_hidden_layers=args.layers, hidden_size=args.hidden,
                               intermediate_size=args.ffn, vocab_size=args.vocab, num_attention_heads=8,
                               num_key_value_heads=2)
  with tempfile.TemporaryDirectory() as root:
    checkpoint.save(mixtral_jax.create_model(cfg, seed=0), f"{root}/orbax")
    checkpoint.export(f"{root}/orbax", f"{root}/hf")
    from mixtral_jax.checkpoint.orbax_io import ParamsReader
    gib = ParamsReader(f"{root}/orbax/params").nbytes() / 2**30
    cases = {
        "convert": lambda: checkpoint.convert(f"{root}/hf", f"{root}/out", overwrite=True),
        "load hf": lambda: jax_block(mixtral_jax.from_pretrained(f"{root}/hf")),
        "load orbax": lambda: jax_block(mixtral_jax.from_pretrained(f"{root}/orbax")),
    }
    before = {"load orbax": lambda: jax_block(orbax_restore(f"{root}/orbax"))}
    for case in list(cases.values()) + list(before.values()):  # warm: compilation, page cache
      case()
    times = {(name, on): [] for name in cases for on in (True, False)}
    for _ in range(args.repeats):
      for name, case in cases.items():
        times[(name, True)].append(timed(case))
        with checks_disabled():
          times[(name, False)].append(timed(before.get(name, case)))
      shutil.rmtree(f"{root}/out", ignore_errors=True)
  print(f"checkpoint {gib:.2f} GiB float32, {args.layers} layers, D={args.hidden}, F={args.ffn}, "
        f"V={args.vocab}; medians of {args.repeats}")
  for name in cases:
    on, off = statistics.median(times[(name, True)]), statistics.median(times[(name, False)])
    print(f"  {name:11s} checks {on:6.2f}s  without {off:6.2f}s  ratio {on / off:.3f}")


def orbax_restore(ckpt: str):
  """The previous Orbax load path: Orbax's restore of the whole tree into single-device targets."""
  import jax  # noqa: PLC0415
  from mixtral_jax.checkpoint import orbax_io  # noqa: PLC0415
  from mixtral_jax.checkpoint.loading import load_config, our_shapes  # noqa: PLC0415
  cfg = load_config(ckpt)
  shapes, _ = our_shapes(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = orbax_io.abstract_target({k: (s, cfg.param_dtype) for k, s in shapes.items()},
                                    {k: device for k in shapes})
  return orbax_io.restore_params(f"{ckpt}/params", target)


def jax_block(model) -> None:
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  jax.block_until_ready(nnx.state(model) if isinstance(model, nnx.Module) else model)


if __name__ == "__main__":
  main()
