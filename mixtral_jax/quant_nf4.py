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

Our parameters keep their own orientation (``q_DNH``, ``w1_EDF``...): the packing runs along one
contracted axis (``axis``; for ``o_NHD``, whose contraction is N*H, along H, the fastest-varying part
of N*H, so the blocks are bnb's when H is a multiple of the block). The stored arrays have the
parameter's rank and logical axes, with that axis halved (codes) or divided by the block (absmax).

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


def check_axis(shape: tuple[int, ...], axis: int, block: int = BLOCK) -> None:
  """Raises, naming the shape and the axis, if ``shape`` cannot be packed in blocks along ``axis``."""
  axis = axis % len(shape)
  if shape[axis] % block or block % 2:
    raise ValueError(f"nf4: a weight of shape {tuple(shape)} is packed along axis {axis} of size {shape[axis]}, "
                     f"not a multiple of the block size {block} (for o_NHD that axis is head_dim); quantize it as "
                     "int8 or keep it in float")


def quantize(w: jax.Array, block: int = BLOCK, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """(codes uint8, absmax float32) of ``w`` packed along ``axis`` (``[..., K // 2]`` and ``[..., K // block]``
  for the last axis): see the module docstring; the codes equal bitsandbytes' ``quantize_4bit`` codes."""
  check_axis(w.shape, axis, block)
  w_xK = jnp.moveaxis(w, axis, -1)
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
  codes = pack(q_xbB.reshape(*lead, k))
  return jnp.moveaxis(codes, -1, axis), jnp.moveaxis(absmax_xb, -1, axis)


def packed_axis(codes_shape: tuple[int, ...], absmax_shape: tuple[int, ...]) -> int:
  """The axis the codes are packed along: the one where codes and absmax differ (negative index)."""
  differ = [i for i, (c, a) in enumerate(zip(codes_shape, absmax_shape)) if c != a]
  if len(codes_shape) != len(absmax_shape) or len(differ) != 1:
    raise ValueError(f"nf4: codes {tuple(codes_shape)} and absmax {tuple(absmax_shape)} do not describe one "
                     "blocked weight (they must differ in exactly the packed axis); the arrays are mismatched")
  return differ[0] - len(codes_shape)


def dequantize(codes: jax.Array, absmax: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
  """The weight in ``dtype``: ``CODE[q] * absmax`` in float32, then one cast (bnb's ``dequantize_4bit``
  to the last bit). The packed axis and the block size are read off the shapes. Runs on one layer's
  arrays inside the layer scan, so only that layer's weights are ever in float at once."""
  axis = packed_axis(codes.shape, absmax.shape)
  codes_xK2, absmax_xKb = jnp.moveaxis(codes, axis, -1), jnp.moveaxis(absmax, axis, -1)
  *lead, k2 = codes_xK2.shape
  nblocks = absmax_xKb.shape[-1]
  block = 2 * k2 // nblocks
  if block * nblocks != 2 * k2:
    raise ValueError(f"nf4: codes {tuple(codes.shape)} and absmax {tuple(absmax.shape)} do not describe one "
                     "blocked weight (2 x codes must be a multiple of absmax along the packed axis); the arrays "
                     "are mismatched")
  vals_xbB = jnp.asarray(CODE)[unpack(codes_xK2)].reshape(*lead, nblocks, block)
  w_xbB = vals_xbB * absmax_xKb.astype(jnp.float32)[..., None]
  return jnp.moveaxis(w_xbB.reshape(*lead, 2 * k2).astype(dtype), -1, axis)


def pack(q_xK: jax.Array) -> jax.Array:
  """uint8 ``[..., K // 2]`` from 4-bit codes ``[..., K]``: element 2m in the high nibble (bnb's order)."""
  q_xK = q_xK.astype(jnp.uint8)
  return (q_xK[..., 0::2] << 4) | q_xK[..., 1::2]


def unpack(codes_xK2: jax.Array) -> jax.Array:
  """4-bit codes (uint8 ``[..., K]``) from packed bytes: the inverse of :func:`pack`. Kept in uint8 so an
  unfused intermediate costs one byte per weight, not four."""
  c = codes_xK2.astype(jnp.uint8)
  return jnp.stack([c >> 4, c & 0xF], axis=-1).reshape(*codes_xK2.shape[:-1], 2 * codes_xK2.shape[-1])


def stored_shapes(shape: tuple[int, ...], axes: tuple[int, ...], block: int = BLOCK
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(codes shape, absmax shape) of a parameter of ``shape`` whose contracted ``axes`` (negative, from the
  end) are given: packed along the last of them. No data is touched (for plans and abstract states)."""
  axis = axes[-1] % len(shape)
  check_axis(shape, axis, block)
  codes = tuple(n // 2 if i == axis else n for i, n in enumerate(shape))
  absmax = tuple(n // block if i == axis else n for i, n in enumerate(shape))
  return codes, absmax


def nbytes(shape: tuple[int, ...], axes: tuple[int, ...], block: int = BLOCK) -> int:
  """Bytes held by the nf4 form of a parameter: the codes plus the float32 scales."""
  codes, absmax = stored_shapes(shape, axes, block)
  return math.prod(codes) + 4 * math.prod(absmax)


ABSMAX = "_absmax"


class Nf4:
  """The nf4 storage form of a matmul weight ``name``: ``name`` holds the packed codes and the sibling
  leaf ``name + "_absmax"`` the float32 block scales (the interface of ``mixtral_jax.quant``'s forms)."""
  suffixes: tuple[str, ...] = (ABSMAX,)
  skip: tuple[tuple[str, ...], ...] = (("head_DV",),)  # sites left in float (QLoRA keeps the LM head)

  def operand(self, codes, extras: dict, dtype) -> jax.Array:
    return dequantize(codes, extras[ABSMAX], dtype)

  def quantize(self, w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Packed along the last contracted axis (``axes`` negative, from the end)."""
    codes, absmax = quantize(w, axis=axes[-1])
    return codes, {ABSMAX: absmax}

  def extra_axes(self, logical: tuple, axes: tuple[int, ...]) -> dict[str, tuple]:
    """The scales' logical axes: the weight's, with the packed axis unsharded (it is 64 times shorter than
    the weight's and need not divide the mesh; the scales are 1/8 of the codes' bytes)."""
    ndim = len(logical)
    return {ABSMAX: tuple(None if i - ndim == axes[-1] else a for i, a in enumerate(logical))}
