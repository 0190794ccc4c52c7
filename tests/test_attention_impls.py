"""The attention implementations of mixtral_jax.attn against dense attention (the reference), fp32,
values and gradients <= 1e-5 (blockwise, and the GPU flash kernel's mask through tokamax's reference
kernel): packed segments, padding, windows shorter and longer than T, MQA / GQA /
MHA, T and S not multiples of the block, cache layouts (empty and rolled slots, one-token decode). The
block skipping is checked against the full mask (never skips a visible pair; keeps about half the
blocks for causal attention). The selector's choices and refusals are checked without a GPU or TPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.attn import attention_mask, blockwise_attention, choose, dense_attention, live_blocks
from mixtral_jax.attn.flash import flash_attention
from mixtral_jax.config import MixtralConfig

TOL = 1e-5


def _inputs(rs, B, T, S, N, K, H):
  q = rs.normal(size=(B, T, N, H)).astype(np.float32)
  k = rs.normal(size=(B, S, K, H)).astype(np.float32)
  v = rs.normal(size=(B, S, K, H)).astype(np.float32)
  return q, k, v


def _packed(T, cuts, pad):
  """Segments 1, 2, ... starting at ``cuts`` with positions restarting at 0, then ``pad`` padding
  tokens (segment 0, position -1 as keys)."""
  seg = np.zeros(T, np.int32)
  pos = np.zeros(T, np.int32)
  starts = [0] + list(cuts) + [T - pad]
  for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
    seg[a:b] = i + 1
    pos[a:b] = np.arange(b - a)
  kv_pos = np.where(seg > 0, pos, -1)
  return pos, kv_pos, seg


def _cases():
  rs = np.random.RandomState(0)
  out = {}
  # Packed: three documents and trailing padding, GQA, T not a multiple of the block.
  pos, kv_pos, seg = _packed(70, (23, 41), pad=6)
  out["packed_gqa"] = dict(shape=(2, 70, 70, 4, 2), q_pos=np.stack([pos, pos]), kv_pos=np.stack([kv_pos, kv_pos]),
                           seg=np.stack([seg, seg]), window=None)
  # Left padding of different lengths per row, MHA, window shorter than T.
  lp = np.stack([np.maximum(np.arange(45) - p, 0) for p in (0, 17)])
  kvp = np.stack([np.where(np.arange(45) >= p, np.arange(45) - p, -1) for p in (0, 17)])
  out["leftpad_mha_window5"] = dict(shape=(2, 45, 45, 4, 4), q_pos=lp, kv_pos=kvp, seg=None, window=5)
  # MQA, window longer than T.
  ar = np.broadcast_to(np.arange(40), (2, 40))
  out["mqa_window_longer"] = dict(shape=(2, 40, 40, 4, 1), q_pos=ar, kv_pos=ar, seg=None, window=200)
  # A rolled cache of 13 slots (position p in slot p % 13, two slots still empty) plus 3 new
  # tokens: keys are not in position order, window 13.
  slots = np.array([13, 14, 15, 16, 17, 18, 19, 20, -1, -1, 10, 11, 12])
  kv = np.concatenate([slots, [21, 22, 23]])
  out["rolled_cache"] = dict(shape=(2, 3, 16, 4, 2), q_pos=np.broadcast_to([21, 22, 23], (2, 3)),
                             kv_pos=np.broadcast_to(kv, (2, 16)), seg=None, window=13)
  # One-token decode over a long, partly empty cache.
  kv = np.where(np.arange(61) < 50, np.arange(61), -1)
  kv[60] = 50
  out["decode"] = dict(shape=(2, 1, 61, 4, 2), q_pos=np.full((2, 1), 50), kv_pos=np.broadcast_to(kv, (2, 61)),
                       seg=None, window=None)
  for c in out.values():
    B, T, S, N, K = c["shape"]
    c["qkv"] = _inputs(rs, B, T, S, N, K, 8)
    c["w"] = rs.normal(size=(B, T, N, 8)).astype(np.float32)
  return out


CASES = _cases()


@functools.partial(jax.jit, static_argnames=("impl", "window"))
def _value_and_grads(q, k, v, w, q_pos, kv_pos, seg, *, impl, window):
  def f(q, k, v):
    if impl == "dense":
      out = dense_attention(q, k, v, q_pos, kv_pos, seg, seg, sliding_window=window)
    elif impl == "flash":  # the GPU flash kernel's mask through tokamax's reference kernel (no Triton on CPU)
      out = flash_attention(q, k, v, kv_pos, seg, sliding_window=window, kernel="xla")
    else:
      out = blockwise_attention(q, k, v, q_pos, kv_pos, seg, seg, sliding_window=window, block_q=16, block_k=8)
    return jnp.sum(out * w), out

  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


SELF_ATTENTION = ("leftpad_mha_window5", "mqa_window_longer", "packed_gqa")  # no cache: index-aligned


@pytest.mark.parametrize("impl, name",
                         [("blockwise", n) for n in sorted(CASES)] + [("flash", n) for n in SELF_ATTENTION])
@pytest.mark.slow
def test_kernel_matches_dense_values_and_gradients(impl, name):
  """flash: the index ranges (run starts, window) handed to the GPU kernel express our mask exactly,
  checked through tokamax's reference kernel with the same mask object."""
  c = CASES[name]
  q_pos, kv_pos = jnp.asarray(c["q_pos"], jnp.int32), jnp.asarray(c["kv_pos"], jnp.int32)
  seg = None if c["seg"] is None else jnp.asarray(c["seg"])
  mask = np.asarray(attention_mask(q_pos, kv_pos, sliding_window=c["window"], q_seg_BT=seg, kv_seg_BS=seg))
  sees = mask.any(-1)  # rows that see no key (pads) are never used; their values may differ
  if impl == "flash":  # a pad query sees the other pads of its run there (never used either)
    sees &= np.asarray(kv_pos) >= 0
  w = c["w"] * sees[:, :, None, None]
  got = _value_and_grads(*c["qkv"], w, q_pos, kv_pos, seg, impl=impl, window=c["window"])
  want = _value_and_grads(*c["qkv"], w, q_pos, kv_pos, seg, impl="dense", window=c["window"])
  out, want_out = np.asarray(got[0]), np.asarray(want[0])
  assert np.isfinite(out).all()
  assert np.abs(out - want_out)[sees].max() <= TOL
  for what, g, wg in zip("qkv", got[1], want[1]):
    assert np.abs(np.asarray(g) - np.asarray(wg)).max() <= TOL, f"d{what}"


def test_live_blocks_never_skip_a_visible_pair_and_halve_causal_work():
  rs = np.random.RandomState(1)
  tq, tk = 4, 8
  for window in (None, 6):
    for _ in range(20):
      # Random positions with padding, restarts and shuffles: a bound must hold for any layout.
      q_pos = rs.randint(0, 40, (2, 16))
      kv_pos = np.where(rs.rand(2, 32) < 0.3, -1, rs.randint(0, 40, (2, 32)))
      seg_q, seg_k = rs.randint(1, 3, (2, 16)), rs.randint(1, 3, (2, 32))
      mask = np.asarray(attention_mask(jnp.asarray(q_pos), jnp.asarray(kv_pos), sliding_window=window,
                                       q_seg_BT=jnp.asarray(seg_q), kv_seg_BS=jnp.asarray(seg_k)))
      needed = mask.reshape(2, 4, tq, 4, tk).any((0, 2, 4))
      live = np.asarray(live_blocks(jnp.asarray(q_pos.reshape(2, 4, tq)), jnp.asarray(kv_pos.reshape(2, 4, tk)),
                                    sliding_window=window, q_seg_BnQ=jnp.asarray(seg_q.reshape(2, 4, tq)),
                                    kv_seg_BnK=jnp.asarray(seg_k.reshape(2, 4, tk))))
      assert not (needed & ~live).any()
  # Positions = index, 16 blocks of 32: causal keeps the 136 blocks on and below the diagonal,
  # a window of 64 the diagonal and the two blocks before it.
  ar = jnp.arange(512).reshape(1, 16, 32)
  assert int(live_blocks(ar, ar).sum()) == 16 * 17 // 2
  assert int(live_blocks(ar, ar, sliding_window=64).sum()) == 16 + 15 + 14
  # Packed (positions restart per document): blocks of different documents are skipped too.
  pos = jnp.concatenate([jnp.arange(256), jnp.arange(256)]).reshape(1, 16, 32)
  seg = jnp.repeat(jnp.array([1, 2]), 256).reshape(1, 16, 32)
  assert int(live_blocks(pos, pos, q_seg_BnQ=seg, kv_seg_BnK=seg).sum()) == 2 * (8 * 9 // 2)


def _choose(impl, platform="cpu", T=4096, S=4096, H=128, dtype="float32", index_aligned=True, packed=False,
            padded=False):
  return choose(impl, platform=platform, T=T, S=S, head_dim=H, dtype=jnp.dtype(dtype), index_aligned=index_aligned,
                packed=packed, padded=padded)[0]


def test_auto_choice_per_platform_and_shape():
  assert _choose("auto", T=64, S=64) == "dense"
  assert _choose("auto", T=1, S=4096) == "dense"  # one-token decode over a short cache
  assert _choose("auto") == "blockwise"
  assert _choose("auto", T=1, S=32768) == "blockwise"  # decode over a long cache
  assert _choose("auto", platform="tpu") == "splash"
  assert _choose("auto", platform="tpu", packed=True, padded=True) == "splash"
  assert _choose("auto", platform="tpu", index_aligned=False) == "blockwise"  # a KV cache
  assert _choose("auto", platform="gpu", dtype="bfloat16") == "cudnn"
  assert _choose("auto", platform="gpu") == "flash"  # float32: cuDNN computes in 16 bits
  assert _choose("auto", platform="gpu", dtype="bfloat16", packed=True, padded=True) == "flash"  # training rows
  assert _choose("auto", platform="gpu", dtype="bfloat16", padded=True) == "flash"
  assert _choose("auto", platform="gpu", dtype="bfloat16", index_aligned=False) == "blockwise"  # a KV cache
  assert _choose("dense", platform="tpu") == "dense" and _choose("blockwise", platform="gpu") == "blockwise"


@pytest.mark.parametrize("impl, kw, words", [
    ("splash", dict(platform="cpu"), "TPU kernel"),
    ("splash", dict(platform="gpu"), "TPU kernel"),
    ("splash", dict(platform="tpu", index_aligned=False), "KV cache"),
    ("cudnn", dict(platform="cpu", dtype="bfloat16"), "GPU kernel"),
    ("cudnn", dict(platform="gpu"), "bfloat16"),
    ("cudnn", dict(platform="gpu", dtype="bfloat16", H=96 + 4), "head dim"),
    ("cudnn", dict(platform="gpu", dtype="bfloat16", packed=True), "segment"),
    ("flash", dict(platform="cpu"), "GPU kernel"),
    ("flash", dict(platform="gpu", index_aligned=False), "KV cache"),
    ("flash", dict(platform="gpu", H=72), "head dim"),
])
def test_a_kernel_that_cannot_run_is_an_error_naming_the_alternative(impl, kw, words):
  with pytest.raises(ValueError, match=f"attention_impl='{impl}'.*{words}.*'blockwise'"):
    _choose(impl, **kw)


def test_config_refuses_unknown_impl_and_bad_block():
  with pytest.raises(ValueError, match="attention_impl='cutlass' is not one of auto, dense, blockwise"):
    MixtralConfig(attention_impl="cutlass")
  with pytest.raises(ValueError, match="attention_block must be positive"):
    MixtralConfig(attention_block=0)
  with pytest.raises(ValueError, match="sliding_window must be positive"):
    MixtralConfig(sliding_window=0)
  assert "attention_impl" not in MixtralConfig(attention_impl="blockwise").to_hf_dict()


@pytest.mark.slow
def test_splash_in_interpret_mode_matches_blockwise():
  """The TPU kernel, run by Pallas' interpreter on CPU, forward and gradients, in its shard_map over a
  data=2 x tensor=2 mesh (a row and a kv head per device): two packed documents, trailing padding,
  a window of 37, GQA, T = 250 (padded to 256 inside, blocks of 128)."""
  from mixtral_jax.attn.splash import splash_attention
  from mixtral_jax.sharding.mesh import make_mesh

  rs = np.random.RandomState(2)
  B, T, N, K, H, W = 2, 250, 4, 2, 128, 37
  q, k, v = (jnp.asarray(x) for x in _inputs(rs, B, T, T, N, K, H))
  pos, kv_pos, seg = (jnp.asarray(np.stack([x, x])) for x in _packed(T, (100,), pad=30))
  real = np.asarray(seg > 0)
  w = rs.normal(size=(B, T, N, H)).astype(np.float32) * real[:, :, None, None]

  def splash(q, k, v):
    return splash_attention(q, k, v, kv_pos, seg, sliding_window=W, block=128, interpret=True)

  def blockwise(q, k, v):
    return blockwise_attention(q, k, v, pos, kv_pos, seg, seg, sliding_window=W, block_q=128, block_k=128)

  def run(f):
    def loss(*a):
      out = f(*a)
      return jnp.sum(out * w), out
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return step, step(q, k, v)

  with jax.set_mesh(make_mesh("data=2,tensor=2", devices=jax.devices()[:4])):
    step, ((_, out_s), g_s) = run(splash)
    assert "sdy.manual_computation" in step.lower(q, k, v).as_text()  # the shard_map
  _, ((_, out_b), g_b) = run(blockwise)
  assert np.abs(np.asarray(out_s) - np.asarray(out_b))[real].max() <= TOL
  for what, a, b in zip("qkv", g_s, g_b):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= TOL, f"d{what}"


def test_cudnn_arguments_express_our_mask():
  """The arguments given to cuDNN (causal, local_window_size=(W-1, 0)), run through
  jax.nn.dot_product_attention's XLA implementation on CPU, equal dense attention with positions
  0..T-1, for a window shorter than T and none; GQA native (K/V not repeated)."""
  from mixtral_jax.attn.cudnn import cudnn_arguments

  rs = np.random.RandomState(3)
  q, k, v = (jnp.asarray(x) for x in _inputs(rs, 2, 33, 33, 4, 2, 8))
  pos = jnp.broadcast_to(jnp.arange(33), (2, 33))

  @jax.jit
  def both(q, k, v):
    outs = []
    for window in (None, 5):
      kw = {**cudnn_arguments(window), "implementation": "xla"}
      want = dense_attention(q, k, v, pos, pos, sliding_window=window)
      outs.append((jax.nn.dot_product_attention(q, k, v, **kw), want))
    return outs

  for got, want in both(q, k, v):
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL


def test_the_choice_is_logged_once(caplog):
  from mixtral_jax.attn import attend
  from mixtral_jax.attn.select import reset_log

  reset_log()
  rs = np.random.RandomState(4)
  q, k, v = (jnp.asarray(x) for x in _inputs(rs, 1, 4, 4, 2, 1, 8))
  pos = jnp.arange(4)[None]
  with caplog.at_level("INFO", logger="mixtral_jax.attn.select"):
    for _ in range(3):
      attend(q, k, v, pos, pos)
  records = [r.getMessage() for r in caplog.records if r.name == "mixtral_jax.attn.select"]
  assert len(records) == 1 and records[0].startswith("attention: dense (short; attention_impl=auto"), records


def test_blockwise_under_a_mesh_equals_one_device():
  """Batch over data x fsdp, kv heads over tensor (GSPMD partitions the block loops; the live
  block lists are a union over the whole batch): forward and gradients equal the unsharded run."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mixtral_jax.sharding.mesh import make_mesh

  c = CASES["packed_gqa"]
  rs = np.random.RandomState(6)
  q, k, v = (np.concatenate([x, x[::-1]]) for x in c["qkv"])  # batch 4
  w = rs.normal(size=q.shape).astype(np.float32)
  q_pos, kv_pos, seg = (jnp.asarray(np.concatenate([x, x])) for x in (c["q_pos"], c["kv_pos"], c["seg"]))
  want = _value_and_grads(q, k, v, w, q_pos, kv_pos, seg, impl="blockwise", window=None)
  mesh = make_mesh("data=2,fsdp=2,tensor=2")

  def put(x):
    return jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))

  with jax.set_mesh(mesh):
    got = _value_and_grads(put(q), put(k), put(v), put(w), q_pos, kv_pos, seg, impl="blockwise", window=None)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= TOL
