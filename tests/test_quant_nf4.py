"""nf4 quantize/dequantize against bitsandbytes (the reference), bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import quant_nf4

import torch
import bitsandbytes.functional as bnbf

TORCH_DTYPES = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}


def _bits(a) -> np.ndarray:
  """The raw bits of a float array (torch or JAX), so comparisons are exact, NaN and -0 included."""
  if isinstance(a, torch.Tensor):
    a = a.float().numpy() if a.dtype == torch.bfloat16 else a.numpy()
  a = np.asarray(a)
  if a.dtype != np.float32 and a.dtype != np.float16:
    a = a.astype(np.float32)  # bf16 -> f32 is exact
  return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


def _weights(rows=24, k=256, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.01, 3.0, (rows, 1)).astype(np.float32)
  w[0, :64] = 0.0  # an all-zero block
  w[1, 64:128] = -2.5  # a constant block whose absmax is negative
  w[2, :64] = np.float32(1.0)  # absmax 1, so the scaled values are the weights themselves...
  w[2, 1:16] = quant_nf4.MIDPOINTS  # ...and these sit exactly on the decision boundaries (ties)
  w[2, 16:31] = -quant_nf4.MIDPOINTS[::-1]
  w[3, :64] = np.nextafter(np.tile(quant_nf4.MIDPOINTS, 5)[:64], np.float32(2))  # just above
  w[3, 0] = 1.0
  return w


def test_codebook_equals_bitsandbytes_and_qwix():
  bnb_code = bnbf.get_4bit_type("nf4", device="cpu").numpy()
  np.testing.assert_array_equal(_bits(quant_nf4.CODE), _bits(bnb_code))
  from qwix._src.core import numerics  # noqa: PLC0415 (the codebook lives only there)
  np.testing.assert_array_equal(_bits(quant_nf4.CODE), _bits(np.asarray(numerics.get_nf4_buckets(), np.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_quantize_equals_bitsandbytes_codes(dtype):
  w = jnp.asarray(_weights(), dtype)
  codes, absmax = jax.jit(quant_nf4.quantize)(w)
  w_t = torch.from_numpy(np.array(w.astype(jnp.float32))).to(TORCH_DTYPES[dtype])
  ref_codes, state = bnbf.quantize_4bit(w_t, blocksize=64, quant_type="nf4")
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), ref_codes.numpy().reshape(-1))
  np.testing.assert_array_equal(_bits(absmax).reshape(-1), _bits(state.absmax))
  assert codes.shape == (24, 128) and absmax.shape == (24, 4) and codes.dtype == jnp.uint8


def test_ties_take_the_lower_code():
  codes, _ = quant_nf4.quantize(jnp.asarray(_weights()[2:3]))
  q = np.asarray(quant_nf4.unpack(codes))[0]
  np.testing.assert_array_equal(q[1:16], np.arange(15))  # midpoint j -> code j, not j + 1
  assert q[0] == 15


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dequantize_equals_bitsandbytes_to_the_last_bit(dtype):
  w_t = torch.from_numpy(_weights(seed=1)).to(TORCH_DTYPES[dtype])
  ref_codes, state = bnbf.quantize_4bit(w_t, blocksize=64, quant_type="nf4")
  ref = bnbf.dequantize_4bit(ref_codes, state)
  codes = jnp.asarray(ref_codes.numpy().reshape(24, 128))
  absmax = jnp.asarray(state.absmax.numpy().reshape(24, 4))
  ours = jax.jit(quant_nf4.dequantize, static_argnums=2)(codes, absmax, dtype)
  assert ours.dtype == dtype and ours.shape == (24, 256)
  np.testing.assert_array_equal(_bits(ours), _bits(ref))


def test_dequantize_arbitrary_codes_and_scales_bitwise():
  """Every byte value and scales of many magnitudes, not only ones quantize produced."""
  rng = np.random.default_rng(2)
  codes = rng.integers(0, 256, (16, 64), dtype=np.uint8)
  absmax = (rng.standard_normal((16, 2)) * 10.0 ** rng.integers(-6, 6, (16, 2))).astype(np.float32)
  state = bnbf.QuantState(absmax=torch.from_numpy(absmax.reshape(-1)), shape=torch.Size((16, 128)),
                          code=bnbf.get_4bit_type("nf4", device="cpu"), blocksize=64, quant_type="nf4",
                          dtype=torch.bfloat16)
  ref = bnbf.dequantize_4bit(torch.from_numpy(codes.reshape(-1, 1)), state)
  ours = quant_nf4.dequantize(jnp.asarray(codes), jnp.asarray(absmax), jnp.bfloat16)
  np.testing.assert_array_equal(_bits(ours), _bits(ref))


def test_round_trip_error_is_bounded_by_the_codebook_gaps():
  w = _weights(seed=3)
  codes, absmax = quant_nf4.quantize(jnp.asarray(w))
  back = np.asarray(quant_nf4.dequantize(codes, absmax, jnp.float32))
  half_gap = np.max(np.diff(quant_nf4.CODE)) / 2
  bound = np.repeat(np.asarray(absmax), 64, axis=-1) * half_gap * (1 + 1e-6)
  assert np.all(np.abs(back - w) <= bound)


def test_other_block_sizes_match_bitsandbytes():
  w_t = torch.from_numpy(_weights(seed=4))
  ref_codes, state = bnbf.quantize_4bit(w_t, blocksize=128, quant_type="nf4")
  codes, absmax = quant_nf4.quantize(jnp.asarray(w_t.numpy()), block=128)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), ref_codes.numpy().reshape(-1))
  np.testing.assert_array_equal(_bits(quant_nf4.dequantize(codes, absmax, jnp.float32)),
                                _bits(bnbf.dequantize_4bit(ref_codes, state)))


@pytest.mark.parametrize("shape,axes,codes_shape,absmax_shape", [
    ((128, 4, 32), (-3,), (64, 4, 32), (2, 4, 32)),          # q_DNH: packed along D
    ((4, 64, 128), (-3, -2), (4, 32, 128), (4, 1, 128)),     # o_NHD: along H, the fast part of N*H
    ((2, 3, 64, 128), (-2,), (2, 3, 32, 128), (2, 3, 1, 128)),  # w1_EDF with a layer axis: along D
])
def test_packing_along_a_contracted_axis(shape, axes, codes_shape, absmax_shape):
  w = jnp.asarray(np.random.default_rng(6).standard_normal(shape), jnp.float32)
  codes, absmax = quant_nf4.quantize(w, axis=axes[-1])
  assert (codes.shape, absmax.shape) == (codes_shape, absmax_shape) == quant_nf4.stored_shapes(shape, axes)
  moved_codes, moved_absmax = quant_nf4.quantize(jnp.moveaxis(w, axes[-1], -1))
  np.testing.assert_array_equal(jnp.moveaxis(codes, axes[-1], -1), moved_codes)
  np.testing.assert_array_equal(jnp.moveaxis(absmax, axes[-1], -1), moved_absmax)
  back = quant_nf4.dequantize(codes, absmax, jnp.float32)
  np.testing.assert_array_equal(jnp.moveaxis(back, axes[-1], -1), quant_nf4.dequantize(moved_codes, moved_absmax,
                                                                                         jnp.float32))
  assert quant_nf4.packed_axis(codes.shape, absmax.shape) == axes[-1]


def test_our_orientation_holds_bitsandbytes_codes():
  """q_DNH packed along D holds, byte for byte, bnb's codes of HF's q_proj.weight [N*H, D] transposed;
  o_NHD packed along H those of o_proj.weight [D, N*H]."""
  rng = np.random.default_rng(5)
  N, H, D = 2, 64, 128
  q_proj = rng.standard_normal((N * H, D)).astype(np.float32)
  ref, state = bnbf.quantize_4bit(torch.from_numpy(q_proj), blocksize=64, quant_type="nf4")
  codes, absmax = quant_nf4.quantize(jnp.asarray(q_proj.T.reshape(D, N, H)), axis=-3)
  np.testing.assert_array_equal(codes, ref.numpy().reshape(N, H, D // 2).transpose(2, 0, 1))
  np.testing.assert_array_equal(absmax, state.absmax.numpy().reshape(N, H, D // 64).transpose(2, 0, 1))
  o_proj = rng.standard_normal((D, N * H)).astype(np.float32)
  ref, state = bnbf.quantize_4bit(torch.from_numpy(o_proj), blocksize=64, quant_type="nf4")
  codes, absmax = quant_nf4.quantize(jnp.asarray(o_proj.reshape(D, N, H).transpose(1, 2, 0)), axis=-2)
  np.testing.assert_array_equal(codes, ref.numpy().reshape(D, N, H // 2).transpose(1, 2, 0))
  np.testing.assert_array_equal(absmax, state.absmax.numpy().reshape(D, N, H // 64).transpose(1, 2, 0))


def test_bad_shapes_name_the_cause():
  with pytest.raises(ValueError, match="not a multiple of the block size 64"):
    quant_nf4.quantize(jnp.zeros((4, 96)))
  with pytest.raises(ValueError, match="mismatched"):
    quant_nf4.dequantize(jnp.zeros((4, 32), jnp.uint8), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="mismatched"):
    quant_nf4.dequantize(jnp.zeros((4, 32), jnp.uint8), jnp.zeros((2, 1)))


def test_the_storage_form_round_trips_through_its_leaves():
  form = quant_nf4.Nf4()
  w = jnp.asarray(np.random.default_rng(7).standard_normal((128, 4, 32)), jnp.float32)  # q_DNH
  codes, extras = form.quantize(w, (-3,))
  assert codes.shape == (64, 4, 32) and extras["_absmax"].shape == (2, 4, 32)
  np.testing.assert_array_equal(form.operand(codes, extras, jnp.float32),
                                quant_nf4.dequantize(*quant_nf4.quantize(w, axis=-3), jnp.float32))
  assert form.extra_axes(("embed", "heads", "head_dim"), (-3,)) == {"_absmax": (None, "heads", "head_dim")}
  assert form.extra_axes(("heads", "head_dim", "embed"), (-3, -2)) == {"_absmax": ("heads", None, "embed")}
