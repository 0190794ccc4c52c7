"""Remat policies (``mixtral_jax.model.REMAT_POLICIES``): every policy computes the same loss and
gradients as ``full`` (the reference: full recomputation, itself checked against ``none`` in
test_model), run jitted on CPU, whose devices have pinned host memory, so ``offload`` really moves its
activations to host and back; bad names and offload without host memory are refused in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.model import OFFLOADING, REMAT_POLICIES, remat_policy

CFG = mixtral_jax.get_config("tiny", vocab_size=256, num_hidden_layers=2, moe_block=16)


X = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)), jnp.int32)


def _grad_fn(remat):
  return _grad_fn_for(CFG, remat)


def _grad_fn_for(cfg, remat):
  graph, params = nnx.split(mixtral_jax.Mixtral(cfg.replace(remat=remat), rngs=nnx.Rngs(3)))

  def loss(params):
    logits, aux = nnx.merge(graph, params)(X, return_router_logits=True)
    return jnp.mean(logits ** 2) + jnp.mean(aux["router_logits"] ** 2)
  return jax.value_and_grad(loss), params


@pytest.fixture(scope="module")
def full():
  fn, params = _grad_fn("full")
  return jax.jit(fn)(params)


@pytest.mark.parametrize("remat", ["save_projections", "save_attn_moe_in", "offload", "offload_projections",
                                   "offload_gate_up"])
@pytest.mark.slow
def test_policy_equals_full(remat, full):
  fn, params = _grad_fn(remat)
  v, g = jax.jit(fn)(params)
  v_ref, g_ref = full
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref)):
    np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7, err_msg=str(path))
  # What the backward keeps: the offloading policies' residuals live in host memory (typed f32<host> in
  # the jaxpr; XLA:CPU then drops the placement, host and device memory being one), the others' do not.
  # offload_gate_up offloads nothing here: CPU's blocked expert kernel keeps its gate and up products
  # inside its own custom VJP, unnamed (the capacity path below names them).
  jaxpr = str(jax.make_jaxpr(fn)(params))
  assert ("<host>" in jaxpr) == (remat in OFFLOADING and remat != "offload_gate_up")


# The batched-einsum experts of the capacity path (the TPU path with a capacity factor), where the
# expert products carry their names; CPU's default blocked kernel keeps its own residuals (custom VJP).
DENSE = CFG.replace(moe_impl="dense", capacity_factor=2.0)


def _saved_residuals(cfg, remat, capsys) -> list[str]:
  """The residuals the backward keeps, as ``jax.ad_checkpoint.print_saved_residuals`` lists them."""
  graph, params = nnx.split(mixtral_jax.Mixtral(cfg.replace(remat=remat), rngs=nnx.Rngs(3)))
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(lambda p: jnp.mean(nnx.merge(graph, p)(X) ** 2), params)
  return capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_save_projections_keeps_the_expert_products(capsys):
  """save_projections keeps each layer's expert gate and up products [E, C, F], the experts' input rows
  [E, C, D] and each token's k expert outputs [N, k, D] (stacked over the L layers by the scan) where
  ``dots`` (the dense projections only) keeps none of them, and its values and gradients still equal
  full's."""
  from mixtral_jax.routing import capacity  # noqa: PLC0415
  L, E, D, F = DENSE.num_hidden_layers, DENSE.num_local_experts, DENSE.hidden_size, DENSE.intermediate_size
  C = capacity(X.size, DENSE.num_experts_per_tok, E, DENSE.capacity_factor)
  N, k = X.size, DENSE.num_experts_per_tok
  gate_up, rows = f"f32[{L},{E},{C},{F}] output of scan", f"f32[{L},{E},{C},{D}] output of scan"
  outs = f"f32[{L},{N},{k},{D}] output of scan"
  kept = _saved_residuals(DENSE, "save_projections", capsys)
  assert [sum(line.startswith(w) for line in kept) for w in (gate_up, rows, outs)] == [2, 1, 1], kept
  dots = _saved_residuals(DENSE, "dots", capsys)
  assert not any(line.startswith((gate_up, rows, outs)) for line in dots)
  fns = {r: _grad_fn_for(DENSE, r) for r in ("save_projections", "full")}
  (v, g), (v_ref, g_ref) = (jax.jit(fn)(params) for fn, params in fns.values())
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref)):
    np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7, err_msg=str(path))


# Which of the named tensors each offloading policy sends to host memory; the rest of them stay on the device.
ON_HOST = {"offload_projections": ("gate", "up", "in", "out", "attn"), "offload_gate_up": ("gate", "up")}


@pytest.mark.parametrize("remat", list(ON_HOST))
def test_offloading_policies_keep_the_expert_products(remat, capsys):
  """offload_projections keeps what save_projections keeps by name (expert input rows, gate and up
  products, the k expert outputs per token) plus the attention output, every one in host memory
  (``f32<host>``); offload_gate_up sends only the F-wide gate and up products there and keeps the
  D-wide ones on the device. Neither keeps q/k/v (save_projections' unnamed dots). Values and gradients
  equal full's (above, for the blocked kernel; here for the capacity path)."""
  from mixtral_jax.routing import capacity  # noqa: PLC0415
  L, E, D, F = DENSE.num_hidden_layers, DENSE.num_local_experts, DENSE.hidden_size, DENSE.intermediate_size
  C, N, k = capacity(X.size, DENSE.num_experts_per_tok, E, DENSE.capacity_factor), X.size, DENSE.num_experts_per_tok
  B, T = X.shape
  shapes = {"gate": f"[{L},{E},{C},{F}]", "up": f"[{L},{E},{C},{F}]", "in": f"[{L},{E},{C},{D}]",
            "out": f"[{L},{N},{k},{D}]", "attn": f"[{L},{B},{T},{D}]"}
  kept = [line.split(" output of scan")[0] for line in _saved_residuals(DENSE, remat, capsys)
          if " output of scan" in line]
  on_host = sorted(s.removeprefix("f32<host>") for s in kept if s.startswith("f32<host>"))
  assert on_host == sorted(shapes[n] for n in ON_HOST[remat]), kept
  # On the device: what every policy keeps (each layer's input, the scan's per-layer residual, and the
  # last layer's output) and the named tensors this policy does not offload.
  on_device = [f"[{B},{T},{D}]", f"[{L},{B},{T},{D}]"] + [v for n, v in shapes.items() if n not in ON_HOST[remat]]
  assert sorted(s.removeprefix("f32") for s in kept if not s.startswith("f32<host>")) == sorted(on_device), kept
  fns = {r: _grad_fn_for(DENSE, r) for r in (remat, "full")}
  (v, g), (v_ref, g_ref) = (jax.jit(fn)(params) for fn, params in fns.values())
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref)):
    np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_bad_policy_names_and_offload_without_host_memory():
  with pytest.raises(ValueError, match=r"remat 'half': no such policy; choose one of none, save_projections"):
    remat_policy("half")
  assert remat_policy("full") is REMAT_POLICIES["full"]

  class NoHost:
    platform = "metal"  # a backend without memory spaces (GPUs have pinned host memory: test_plan_gpu)

    def addressable_memories(self):
      raise NotImplementedError

  with pytest.raises(ValueError, match=r"remat 'offload' needs pinned host memory, which metal devices lack"):
    remat_policy("offload", [NoHost()])
  with pytest.raises(ValueError, match=r"remat 'offload_projections' needs pinned host memory, which metal"):
    remat_policy("offload_projections", [NoHost()])
  remat_policy("offload", jax.devices())  # CPU devices have pinned_host
  remat_policy("offload_projections", jax.devices())


@pytest.fixture(scope="module")
def tpu_mesh():
  from mixtral_jax.sharding.mesh import make_mesh  # noqa: PLC0415
  from mixtral_jax.train.plan import topology  # noqa: PLC0415
  return make_mesh("fsdp=2,expert=2", devices=topology.tpu_devices("v5p-8"), num_experts=8)


@pytest.mark.libtpu
def test_policies_compile_for_tpu(tpu_mesh, tmp_path):
  """The train step under each policy compiles with the TPU compiler. Recompute shows in the compiled
  FLOPs: none <= save_projections < save_attn_moe_in < full, and save_projections exchanges tokens
  as often as none (the expert inputs and products are kept, so the backward does not dispatch again);
  the offloading policies' kept activations land in host memory (XLA's memory space S(5) in the
  compiled layouts), which no other policy uses. (At this tiny size the
  compiled FLOPs are about 2x the analytic count even without remat, so the reference here is the
  compiled ``none`` program, not the analytic recompute factor that ``plan`` prints at full size.)"""
  from mixtral_jax.train.plan.training import plan  # noqa: PLC0415

  flops, host, a2a = {}, {}, {}
  for remat in ("none", "save_projections", "save_attn_moe_in", "offload", "offload_projections", "offload_gate_up",
                "full"):
    hlo = tmp_path / f"{remat}.hlo"
    out = plan(CFG.replace(remat=remat, dtype="bfloat16"), tpu_mesh, batch=4, seq=128, dump_hlo=str(hlo))
    flops[remat], host[remat] = out["compiled"]["flops"], "S(5)" in hlo.read_text()
    a2a[remat] = out["compiled"]["all_to_all_bytes"] + out["compiled"]["ragged_all_to_all_buffer_bytes"]
  assert flops["none"] <= flops["save_projections"] < flops["save_attn_moe_in"] < flops["full"], flops
  # No second exchange of token rows: at most the ragged dispatch's int32 offsets travel again (64 B
  # here), against the whole dispatch and return that save_attn_moe_in repeats.
  assert 0 <= a2a["save_projections"] - a2a["none"] <= 128 < a2a["save_attn_moe_in"] - a2a["none"], a2a
  assert flops["offload"] == flops["save_attn_moe_in"], flops
  # offload_projections: save_projections' expert products, fetched from host, so no second exchange
  # either; it recomputes q/k/v (save_projections keeps them on the device) and attention, nothing of the
  # experts. Its compiled FLOPs equal save_attn_moe_in's here: what that policy recomputes beyond (the
  # expert FFNs) runs in TPU grouped-matmul kernels outside the HLO FLOP count; the exchange shows it.
  assert 0 <= a2a["offload_projections"] - a2a["none"] <= 128, a2a
  assert flops["save_projections"] <= flops["offload_projections"] <= flops["save_attn_moe_in"], flops
  # offload_gate_up keeps the same set, split between host and device: the same program otherwise.
  assert flops["offload_gate_up"] == flops["offload_projections"], flops
  assert a2a["offload_gate_up"] == a2a["offload_projections"], a2a
  assert host == {"none": False, "save_projections": False, "save_attn_moe_in": False, "offload": True,
                  "offload_projections": True, "offload_gate_up": True, "full": False}, host
