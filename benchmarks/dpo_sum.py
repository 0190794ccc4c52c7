"""DPO with LoRA on the synthetic "correct sum" preference set: held-out preference accuracy over steps.

The base is the ``tiny`` preset (randomly initialised, float32 on CPU; no trained base is on these
machines); LoRA rank 8 (alpha 16) on q, k, v, o, w1, w2, w3; the reference is the same model with the
adapters off (``mixtral_jax.train.dpo.adapters_off``). Pairs from
``mixtral_jax.train.data.synthetic_preference.sum_pairs`` (operands 0..max_operand; train seed 0,
held-out seed 1), encoded by the Mistral v1 chat template; Adam, batches of 16 pairs drawn at random.

  python benchmarks/dpo_sum.py [--steps 200] [--beta 0.1] [--lr 5e-4] [--max-operand 4]

Prints the held-out loss, accuracy and reward margin every ``--every`` steps (one JSON line each).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mixtral_jax.config import get_config
from mixtral_jax.lora import LoraSection, LoRAParam
from mixtral_jax.lora.merge import attach
from mixtral_jax.model import Mixtral
from mixtral_jax.train import dpo
from mixtral_jax.train.data import preference, synthetic_preference


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--max-operand", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--every", type=int, default=20)
  a = p.parse_args(argv)

  cfg = get_config("tiny", dtype="float32")
  model = attach(Mixtral(cfg, rngs=nnx.Rngs(0)), LoraSection(rank=8, alpha=16))
  train = [preference.encode_pair(r) for r in synthetic_preference.sum_pairs(512, 0, a.max_operand)]
  held = [preference.encode_pair(r) for r in synthetic_preference.sum_pairs(64, 1, a.max_operand)]
  longest = max(len(x.prompt) + max(len(x.chosen), len(x.rejected)) for x in train + held) - 1
  T = -(-longest // 8) * 8
  graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
  tx = optax.adam(a.lr)
  opt = tx.init(adapters)
  kw = dict(beta=a.beta, label_smoothing=0.0, loss_type="sigmoid", chunk=T, num_microbatches=1)

  def loss(adapters, rest, mb):  # fresh State objects inside the trace, as the train step builds them
    return dpo.microbatch_loss(nnx.merge(graphdef, adapters, jax.tree.map(lambda x: x, rest)), mb, **kw)

  @jax.jit
  def step(adapters, rest, opt, mb):
    (_, m), g = jax.value_and_grad(loss, has_aux=True)(adapters, rest, mb)
    updates, opt = tx.update(g, opt, adapters)
    return optax.apply_updates(adapters, updates), opt, m

  evaluate = jax.jit(lambda adapters, rest, mb: loss(adapters, rest, mb)[1])
  held_batch = {k: jnp.asarray(v) for k, v in preference.pair_batch(held, T).items()}
  rng, t0 = np.random.default_rng(0), time.time()

  def report(s):
    e = evaluate(adapters, rest, held_batch)
    print(json.dumps({"step": s, "seconds": round(time.time() - t0, 1), "heldout_loss": round(float(e["dpo_loss"]), 4),
                      "heldout_accuracy": round(float(e["accuracy"]), 4),
                      "heldout_margin": round(float(e["reward_margin"]), 4)}), flush=True)

  report(0)
  for s in range(1, a.steps + 1):
    idx = rng.choice(len(train), a.batch, replace=False)
    mb = {k: jnp.asarray(v) for k, v in preference.pair_batch([train[i] for i in idx], T).items()}
    adapters, opt, _ = step(adapters, rest, opt, mb)
    if s % a.every == 0:
      report(s)


if __name__ == "__main__":
  main()
