"""Per-expert LoRA inside the expert computation (mixtral_jax.expert_adapters), for every expert
implementation, against independent references: a float64 NumPy recomputation of
``x W_e + (drop(x) A_e) B_e`` per row, and autodiff of a plain one-hot JAX formulation for the adapter
gradients. Also: the base is never differentiated (no weight-gradient matmul in the program), dropout
masks follow the (token, slot) pair so every dispatch (and the expert-parallel path, with F split over
``tensor``) drops the same elements, and a key with rate 0 changes nothing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import experts, moe, routing
from mixtral_jax.expert_adapters import ExpertLoRA, drop
from mixtral_jax.sharding import make_mesh
from mixtral_jax.sharding.expert_parallel import moe_expert_parallel

E, D, F, R, N, K = 4, 16, 24, 3, 20, 2
KEY = jax.random.key_data(jax.random.key(5))


def _weights(seed=0):
  r = np.random.default_rng(seed)
  w = [r.normal(size=s) / 4 for s in ((E, D, F), (E, D, F), (E, F, D))]
  ab = {t: (r.normal(size=(E, i, R)) / 3, r.normal(size=(E, R, o)) / 3)
        for t, i, o in (("w1", D, F), ("w3", D, F), ("w2", F, D))}
  return w, ab


def _lora(ab, rate=0.0, targets=("w1", "w3", "w2")):
  pairs = {t: tuple(jnp.asarray(a, jnp.float32) for a in ab[t]) for t in targets}
  return ExpertLoRA(**pairs, key=KEY if rate else None, rate=rate)


def _mask(lora, target, rows, width):
  """The keep-and-scale factors ``drop`` applies to each row (ones where nothing drops)."""
  if lora is None or not lora.dropping:
    return np.ones((len(rows), width))
  return np.asarray(_drop_ones(lora, target, jnp.asarray(rows), width), np.float64)


@jax.jit(static_argnums=(1, 3))
def _drop_ones(lora, target, rows, width):
  return drop(lora, target, jnp.ones((rows.shape[0], width), jnp.float32), rows)


def np_rows(x, owner, rows, w, ab, lora):
  """float64: row m through expert owner[m] (zero where owner < 0), with its adapters and dropout mask."""
  w1, w3, w2 = w
  y = np.zeros_like(x)
  masks = {t: _mask(lora, t, rows, F if t == "w2" else D) for t in ab}
  for m in range(len(x)):
    e = owner[m]
    if e < 0:
      continue
    low = lambda t, v: 0 if t not in ab else (v * masks[t][m]) @ ab[t][0][e] @ ab[t][1][e]  # noqa: E731
    a1 = x[m] @ w1[e] + low("w1", x[m])
    a3 = x[m] @ w3[e] + low("w3", x[m])
    h = a1 / (1 + np.exp(-a1)) * a3
    y[m] = h @ w2[e] + low("w2", h)
  return y


def jax_rows(x, owner, masks, w, lora):
  """The same in JAX by one-hot einsums (for autodiff): an implementation independent of the kernels."""
  oh = jax.nn.one_hot(owner, E)  # owner < 0 -> all zero
  def proj(t, v, wt):
    out = jnp.einsum("mi,eio,me->mo", v, wt, oh)
    if lora.get(t) is None:
      return out
    A, B = lora.get(t)
    vd = v * jnp.asarray(masks[t], jnp.float32)
    u = jnp.einsum("mi,eir,me->mr", vd, A, oh)
    return out + jnp.einsum("mr,ero,me->mo", u, B, oh)
  a1, a3 = proj("w1", x, w[0]), proj("w3", x, w[1])
  return proj("w2", jax.nn.silu(a1) * a3, w[2])


def _grad(f, lora, *args):
  """Gradient of f(lora, *args) in the adapter factors only (the key is an integer input)."""
  pairs = {t: lora.get(t) for t in ("w1", "w3", "w2") if lora.get(t) is not None}
  rebuild = lambda p: ExpertLoRA(**p, key=lora.key, rate=lora.rate)  # noqa: E731
  return jax.grad(lambda p, *a: f(rebuild(p), *a), argnums=tuple(range(1 + len(args))))(pairs, *args)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# ------------------------------------------------------------------------------------ kernels


def _layout(impl):
  """Rows, their owner expert, pair ids, and the kernel call for one implementation's layout."""
  if impl == "dense":  # [E, C, D] buckets, partly filled
    C = 6
    fill = np.array([6, 2, 0, 4])
    owner = np.concatenate([np.where(np.arange(C) < fill[e], e, -1) for e in range(E)])
    run = lambda x, w, lora, rows: experts.dense_expert_ffn(  # noqa: E731
        x.reshape(E, C, D), *w, lora, None if rows is None else rows.reshape(E, C)).reshape(E * C, D) * (jnp.asarray(owner) >= 0)[:, None]
  else:
    sizes = np.array([7, 0, 9, 5])
    M = 24  # two rows past the groups: no expert
    owner = np.concatenate([np.repeat(np.arange(E), sizes), -np.ones(M - sizes.sum(), int)])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if impl in ("ragged", "tokamax"):  # lax.ragged_dot, or tokamax's entry point (its xla kernel on CPU)
      kernel = "lax" if impl == "ragged" else "xla"
      run = lambda x, w, lora, rows: experts.ragged_expert_ffn(  # noqa: E731
          x, jnp.asarray(sizes, jnp.int32), *w, lora, rows, kernel=kernel)
    else:
      run = lambda x, w, lora, rows: experts.grouped_expert_ffn(  # noqa: E731
          x, jnp.asarray(starts), jnp.asarray(sizes), *w, impl="blocked", block=4, lora=lora, rows_M=rows)
  rows = np.random.default_rng(1).permutation(100)[:len(owner)]  # arbitrary pair ids
  return owner, rows, run


@pytest.mark.parametrize("impl", ["dense", "blocked", "ragged", "tokamax"])
@pytest.mark.slow
def test_kernels_apply_adapters_in_the_expert_computation(impl, rate=0.4):
  """With dropout (rate 0 is the same sum with all-ones masks; the model-level tests in test_lora.py
  check it against transformers on merged weights and across meshes)."""
  w, ab = _weights()
  owner, rows, run = _layout(impl)
  x = np.random.default_rng(2).normal(size=(len(owner), D))
  lora = _lora(ab, rate)
  wj = tuple(jnp.asarray(a, jnp.float32) for a in w)
  xj, rj = jnp.asarray(x, jnp.float32), jnp.asarray(rows, jnp.int32)
  c = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

  kernel = lambda lora, xj: jnp.sum(run(xj, wj, lora, rj) * c)  # noqa: E731
  masks = {t: _mask(lora, t, rows, F if t == "w2" else D) for t in ab}
  ref = lambda lora, xj: jnp.sum(jax_rows(xj, jnp.asarray(owner), masks, wj, lora) * c)  # noqa: E731
  y, (gl, gx) = jax.jit(lambda lora, xj: (run(xj, wj, lora, rj), _grad(kernel, lora, xj)))(lora, xj)
  assert _rel(y, np_rows(x, owner, rows, w, ab, lora)) <= 2e-5
  rl, rx = jax.jit(lambda lora, xj: _grad(ref, lora, xj))(lora, xj)
  assert _rel(gx, rx) <= 2e-5
  for t in ("w1", "w3", "w2"):
    for got, want in zip(gl[t], rl[t]):
      assert np.abs(np.asarray(want)).max() > 0 and _rel(got, want) <= 2e-5, (impl, t)


def test_dropout_masks_rows_by_pair_id_at_the_rate():
  lora = _lora(_weights()[1], 0.25)
  rows = jnp.arange(400, dtype=jnp.int32)
  m1 = np.asarray(_drop_ones(lora, "w1", rows, 64))
  m3 = np.asarray(_drop_ones(lora, "w3", rows, 64))
  assert set(np.unique(m1)) == {0.0, np.float32(1 / 0.75)}
  assert abs((m1 == 0).mean() - 0.25) < 0.02  # 25,600 draws: 4 sigma is 0.011
  assert (m1 != m3).mean() > 0.2  # every target draws its own mask
  again = np.asarray(_drop_ones(lora, "w1", rows[jnp.array([7, 300, 41])], 64))
  np.testing.assert_array_equal(again, m1[[7, 300, 41]])  # a row's mask is its pair's, wherever it sits


def test_the_frozen_base_gets_no_weight_gradient_matmul():
  """Differentiating the adapters only, no [D, F] weight-gradient dot is traced (in any implementation);
  differentiating the base weights too, the blocked kernel's VJP forms them (the positive control)."""
  w, ab = _weights()
  wj = [jnp.asarray(a, jnp.float32) for a in w]
  lora = _lora(ab)
  dw = re.compile(r"f32\[(16,24|24,16)\] = dot_general")
  for impl in ("dense", "blocked", "ragged"):
    owner, rows, run = _layout(impl)
    x = jnp.ones((len(owner), D))
    adapters_only = str(jax.make_jaxpr(lambda l: _grad(lambda l: jnp.sum(run(x, wj, l, None)), l))(lora))
    assert not dw.search(adapters_only), impl
  owner, rows, run = _layout("blocked")
  both = str(jax.make_jaxpr(lambda l, w: _grad(lambda l, w: jnp.sum(run(x, w, l, None)), l, w))(lora, wj))
  assert dw.search(both)


# ------------------------------------------------------------------------------------ dispatch


def _routing(seed=4):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(N, D)), jnp.float32)
  weights, ids = routing.top_k_route(jnp.asarray(r.normal(size=(N, E)), jnp.float32), K)
  return x, weights, ids


def _np_dispatch(x, weights, ids, w, ab, lora):
  """float64 dropless MoE: y_n = sum_k w_nk FFN_{ids_nk}(x_n), pair id n*k + slot for the masks."""
  x, weights, ids = (np.asarray(a) for a in (x, weights, ids))
  y = np.zeros((N, D))
  for s in range(K):
    rows = np.arange(N) * K + s
    y += weights[:, s, None] * np_rows(x.astype(np.float64), ids[:, s], rows, w, ab, lora)
  return y


@pytest.mark.slow
def test_every_single_device_dispatch_equals_numpy(rate=0.3):
  w, ab = _weights()
  x, weights, ids = _routing()
  wj = tuple(jnp.asarray(a, jnp.float32) for a in w)
  lora = _lora(ab, rate, targets=("w1", "w2"))  # a subset of targets
  ref = _np_dispatch(x, weights, ids, w, {t: ab[t] for t in ("w1", "w2")}, lora)
  C = N * K  # large enough that nothing drops
  runs = {
      "dropless blocked": lambda: moe.dispatch_dropless(x, weights, ids, *wj, impl="blocked", block=4, lora=lora),
      "dropless ragged": lambda: moe.dispatch_dropless(x, weights, ids, *wj, impl="ragged", lora=lora),
      "capacity dense": lambda: moe.dispatch_capacity(x, weights, ids, *wj, capacity=C, impl="dense", lora=lora)[0],
      "capacity blocked": lambda: moe.dispatch_capacity(x, weights, ids, *wj, capacity=C, impl="blocked", block=4,
                                                        lora=lora)[0],
      "selected": lambda: moe.dispatch_selected(x[:3], weights[:3], ids[:3], *wj, lora=lora),
      "selected per-expert": lambda: moe.dispatch_selected(
          x[:3], weights[:3], ids[:3], *wj, experts=tuple(tuple(a[e] for e in range(E)) for a in wj), lora=lora),
  }
  for name, fn in runs.items():
    want = ref[:3] if name.startswith("selected") else ref
    assert _rel(jax.jit(fn)(), want) <= 2e-5, name


def test_a_key_with_rate_zero_is_the_no_dropout_program():
  w, ab = _weights()
  x, weights, ids = _routing()
  wj = tuple(jnp.asarray(a, jnp.float32) for a in w)
  f = jax.jit(lambda lora: moe.dispatch_dropless(x, weights, ids, *wj, impl="blocked", block=4, lora=lora))
  plain = _lora(ab)
  keyed = ExpertLoRA(**{t: plain.get(t) for t in ("w1", "w3", "w2")}, key=KEY, rate=0.0)
  assert np.array_equal(np.asarray(f(keyed)), np.asarray(f(plain)))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blocked", "ragged"])
def test_expert_parallel_dropout_equals_single_device(impl, monkeypatch, mesh_spec="data=2,expert=2,tensor=2"):
  """Adapters sharded with their expert (F over tensor for w2's input), the pair ids travelling with the
  rows (tokens split over data and expert): outputs and adapter gradients equal the single-device
  dropless dispatch with the same masks. ``ragged``: the GPU/TPU path's bookkeeping, on CPU with
  test_expert_parallel's emulated ``ragged_all_to_all`` (the pair ids travel by it too)."""
  if impl == "ragged":
    from test_expert_parallel import _emulated_ragged_all_to_all

    from mixtral_jax.sharding import expert_parallel

    def emulated(operand, output, *args, **kw):  # integer rows (pair ids) go through float32 exactly
      if jnp.issubdtype(operand.dtype, jnp.integer):
        return _emulated_ragged_all_to_all(operand.astype(jnp.float32), output.astype(jnp.float32), *args,
                                           **kw).astype(operand.dtype)
      return _emulated_ragged_all_to_all(operand, output, *args, **kw)

    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated)
    monkeypatch.setattr(expert_parallel, "dispatch_mode", lambda cf, impl, backend=None: "ragged")
  w, ab = _weights()
  x, weights, ids = _routing()
  wj = tuple(jnp.asarray(a, jnp.float32) for a in w)
  lora = _lora(ab, 0.3)
  c = jnp.asarray(np.random.default_rng(6).normal(size=(N, D)), jnp.float32)

  def single(lora):
    return moe.dispatch_dropless(x, weights, ids, *wj, impl="blocked", block=4, lora=lora)

  def parallel(lora):
    return moe_expert_parallel(x, weights, ids, *wj, impl=impl, block=4, lora=lora)[0]

  ref_y, (ref_g,) = jax.jit(lambda l: (single(l), _grad(lambda l: jnp.sum(single(l) * c), l)))(lora)
  mesh = make_mesh(mesh_spec, num_experts=E)
  with jax.set_mesh(mesh):
    y, (g,) = jax.jit(lambda l: (parallel(l), _grad(lambda l: jnp.sum(parallel(l) * c), l)))(lora)
  assert _rel(y, ref_y) <= 1e-5
  for t in ("w1", "w3", "w2"):
    for got, want in zip(g[t], ref_g[t]):
      assert _rel(got, want) <= 1e-5, t
