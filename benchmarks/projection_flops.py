"""Compiled FLOPs and dot counts of tiny programs, to check that a refactor of the projections leaves the
compiled matmuls unchanged: the float model's loss gradient, a LoRA model's forward with dropout (every
target), the int8 model's forward, and one decode step over ``layer_views``.

  JAX_PLATFORMS=cpu python benchmarks/projection_flops.py

Prints ``name (flops, dot count, convolution count)`` per program; compare the lines against the parent
commit's (see docs/benchmarks.md).
"""
import os
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp
from flax import nnx
from mixtral_jax.config import get_config as preset
from mixtral_jax.model import Mixtral, layer_views, init_cache
from mixtral_jax.lora import LoraSection
from mixtral_jax.inference.quantize import quantize
from mixtral_jax.lora.adapters import LoRAParam

cfg = preset("tiny").replace(vocab_size=256, hidden_size=64, intermediate_size=128)
ids = jnp.ones((2, 16), jnp.int32)
out = {}

def report(name, fn, *args):
  c = jax.jit(fn).lower(*args).compile()
  txt = c.as_text()
  out[name] = (c.cost_analysis().get("flops"), txt.count(" dot("), txt.count("convolution("))

m = Mixtral(cfg, rngs=nnx.Rngs(0))
g, p, rest = nnx.split(m, nnx.Param, ...)
def loss(p, rest, ids):
  mm = nnx.merge(g, p, rest)
  h, aux = mm.hidden(ids)
  hh, w = mm.head_operands(h)
  return jnp.sum(jnp.einsum("btd,dv->btv", hh, w).astype(jnp.float32) ** 2)
report("train_grad", jax.grad(loss), p, rest, ids)

ml = Mixtral(cfg, rngs=nnx.Rngs(0), lora_cfg=LoraSection(rank=4, dropout=0.1, targets=("q","k","v","o","router","w1","w2","w3","lm_head")))
gl, a, restl = nnx.split(ml, LoRAParam, ...)
def lloss(a, restl, ids):
  mm = nnx.merge(gl, a, restl)
  h, aux = mm.hidden(ids, lora_key=jax.random.key(1))
  hh, w = mm.head_operands(h, jax.random.key(2))
  return jnp.sum(jnp.einsum("btd,dv->btv", hh, w).astype(jnp.float32) ** 2)
report("lora_fwd", lloss, a, restl, ids)

mq = quantize(Mixtral(cfg, rngs=nnx.Rngs(0)))
gq, sq = nnx.split(mq)
report("int8_fwd", lambda s, ids: nnx.merge(gq, s)(ids), sq, ids)

mv = Mixtral(cfg, rngs=nnx.Rngs(0))
views = layer_views(mv)
cache = init_cache(cfg, 1, 32)
gv, sv = nnx.split(mv)
def dec(s, views, cache, ids):
  mm = nnx.merge(gv, s)
  h, aux = mm.hidden(ids, cache=cache, layers=views, positions=jnp.zeros((1, 1), jnp.int32))
  return mm.logits(h)
report("views_decode", dec, sv, views, cache, jnp.ones((1, 1), jnp.int32))
for k, v in out.items():
  print(k, v)
