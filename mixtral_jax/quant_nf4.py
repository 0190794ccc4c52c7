"""NF4 (QLoRA's 4-bit NormalFloat) weights in JAX, bit-compatible with bitsandbytes.

Layout (bitsandbytes' ``quantize_4bit(quant_type="nf4", blocksize=64)``, read row-major): a weight whose
contraction axis is last, ``w_xK`` (x = any leading axes, K the contracted width), is cut into blocks of
``BLOCK`` consecutive entries along K. Per block b:

  absmax_b = max_i |w_i|                                 (float32; 0 for an all-zero block)
  s_i      = clip(w_i * (1 / absmax_b), -1, 1)           (float32, a multiply by the reciprocal, as bnb)
  q_i      = #{j : MID_j < s_i}                          (MID = midpoints of the sorted codebook; a value
                                                          exactly on a midpoint takes the lower code,
                                                          as torch.bucketize(right=False) does)
  byte     = q_{2m} << 4 | q_{2m+1}                      (first element in the high nibble)
  w_i     ~= CODE[q_i] * absmax_b                        (product in float32, then cast to the compute
                                                          dtype: bnb's dequantize_4bit exactly)

So ``codes_xK2`` is uint8 ``[..., K // 2]`` and ``absmax_xKb`` float32 ``[..., K // BLOCK]``. bitsandbytes
quantizes a torch ``nn.Linear`` weight ``[out, in]`` flattened; when ``in`` is a multiple of the block
(every Mixtral shape) its flat buffer reshapes to exactly these arrays, so a bitsandbytes checkpoint
loads with no re-quantization and dequantizes to the same bits.

Double quantization: not used for storage. Scales stay float32 (0.5 bit per weight; 8x7B: 2.7 GiB of
absmax beside 21.7 GiB of codes). Checkpoints that double-quantized their scales
(``bnb_4bit_use_double_quant``) are read by expanding the scales to float32 once, with bnb's own
arithmetic (``mixtral_jax.checkpoint.bnb4``), which keeps dequantization bit-exact.

Why not qwix: ``qwix`` has an ``"nf4"`` qtype with the same 16 values, but stores one ``uint4`` per
value (no byte packing in bnb's nibble order), picks codes by ``argmin |CODE - s|`` (a different
tie rule from bnb's midpoints), and exposes its codebook only from the private ``qwix._src``. The tests
check ``CODE`` against both bitsandbytes and qwix.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64

# The NF4 codebook (Dettmers et al. 2023, QLoRA, Appendix E), in float32, sorted.
CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
# Decision boundaries, computed in float32 exactly as bitsandbytes does: (CODE[i] + CODE[i + 1]) / 2.
MIDPOINTS = ((CODE[:-1] + CODE[1:]) / np.float32(2)).astype(np.float32)


def check_shape(shape: tuple[int, ...], block: int = BLOCK, what: str = "weight") -> None:
  """Raises if the last (contracted) axis of ``shape`` cannot be cut into blocks of ``block``."""
  if not shape or shape[-1] % block or block % 2:
    raise ValueError(f"nf4: {what} of shape {tuple(shape)} has a contracted width that is not a multiple of "
                     f"the block size {block}; quantize it as int8 or keep it in float")


def quantize(w_xK: jax.Array, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
  """(codes uint8 ``[..., K // 2]``, absmax float32 ``[..., K // block]``) of ``w_xK``: see the module
  docstring for the algorithm; the codes equal bitsandbytes' ``quantize_4bit`` codes."""
  check_shape(w_xK.shape, block)
  *lead, k = w_xK.shape
  w_xbB = w_xK.astype(jnp.float32).reshape(*lead, k // block, block)
  absmax_xb = jnp.max(jnp.abs(w_xbB), axis=-1)
  # bnb clamps absmax at 1e-38 before the reciprocal; an all-zero block gives s = 0 either way, and
  # writing it as a select keeps XLA's flush-to-zero of subnormals from turning it into 0 * inf.
  recip_xb = jnp.where(absmax_xb > 0, 1.0 / absmax_xb, 0.0)
  s_xbB = jnp.clip(w_xbB * recip_xb[..., None], -1.0, 1.0)
  # q = number of midpoints strictly below s (torch.bucketize, right=False): 15 compares, fused.
  q_xbB = jnp.sum(s_xbB[..., None] > jnp.asarray(MIDPOINTS), axis=-1, dtype=jnp.uint8)
  return pack(q_xbB.reshape(*lead, k)), absmax_xb


def dequantize(codes_xK2: jax.Array, absmax_xKb: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
  """``w_xK`` in ``dtype``: ``CODE[q] * absmax`` in float32, then one cast (bnb's ``dequantize_4bit``
  to the last bit). Runs on one layer's arrays inside the layer scan, so only that layer's weights are
  ever in float at once; the block size is read off the shapes."""
  *lead, k2 = codes_xK2.shape
  nblocks = absmax_xKb.shape[-1]
  block = 2 * k2 // nblocks
  if block * nblocks != 2 * k2 or tuple(absmax_xKb.shape[:-1]) != tuple(lead):
    raise ValueError(f"nf4: codes {tuple(codes_xK2.shape)} and absmax {tuple(absmax_xKb.shape)} do not describe "
                     "one blocked weight (expected absmax [..., 2 * K2 / block]); the arrays are mismatched")
  vals_xbB = jnp.asarray(CODE)[unpack(codes_xK2)].reshape(*lead, nblocks, block)
  w_xbB = vals_xbB * absmax_xKb.astype(jnp.float32)[..., None]
  return w_xbB.reshape(*lead, 2 * k2).astype(dtype)


def pack(q_xK: jax.Array) -> jax.Array:
  """uint8 ``[..., K // 2]`` from 4-bit codes ``[..., K]``: element 2m in the high nibble (bnb's order)."""
  q_xK = q_xK.astype(jnp.uint8)
  return (q_xK[..., 0::2] << 4) | q_xK[..., 1::2]


def unpack(codes_xK2: jax.Array) -> jax.Array:
  """4-bit codes (int32 ``[..., K]``) from packed bytes: the inverse of :func:`pack`."""
  c = codes_xK2.astype(jnp.int32)
  return jnp.stack([c >> 4, c & 0xF], axis=-1).reshape(*codes_xK2.shape[:-1], 2 * codes_xK2.shape[-1])


def contracted_last(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``w`` with its contracted ``axes`` (negative, counted from the end, as in
  ``mixtral_jax.inference.quantize.SITES``) moved last and flattened in order: our ``q_DNH`` becomes
  ``[N, H, D]``, ``o_NHD`` becomes ``[D, N*H]``, ``w1_EDF`` becomes ``[E, F, D]`` - the orientation of
  the Hugging Face ``[out, in]`` weight, so blocks run along the same entries as bitsandbytes'."""
  nd = w.ndim
  contracted = [a % nd for a in axes]
  kept = [a for a in range(nd) if a not in contracted]
  moved = jnp.transpose(w, kept + contracted)
  return moved.reshape(*moved.shape[:len(kept)], math.prod(w.shape[a] for a in contracted))


def restore_layout(w_xK: jax.Array, axes: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`contracted_last`: back to our parameter's ``shape``."""
  nd = len(shape)
  contracted = [a % nd for a in axes]
  kept = [a for a in range(nd) if a not in contracted]
  order = kept + contracted
  w = w_xK.reshape(*(shape[a] for a in order))
  return jnp.transpose(w, np.argsort(order))


def stored_shapes(shape: tuple[int, ...], axes: tuple[int, ...], block: int = BLOCK
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(codes shape, absmax shape) of a parameter of ``shape`` whose contracted ``axes`` are given, without
  touching data (for planning memory and building abstract states)."""
  nd = len(shape)
  contracted = [a % nd for a in axes]
  kept = tuple(shape[a] for a in range(nd) if a not in contracted)
  k = math.prod(shape[a] for a in contracted)
  check_shape(kept + (k,), block)
  return kept + (k // 2,), kept + (k // block,)


def nbytes(shape: tuple[int, ...], axes: tuple[int, ...], block: int = BLOCK) -> int:
  """Bytes held by the nf4 form of a parameter: the codes plus the float32 scales."""
  codes, absmax = stored_shapes(shape, axes, block)
  return math.prod(codes) + 4 * math.prod(absmax)
