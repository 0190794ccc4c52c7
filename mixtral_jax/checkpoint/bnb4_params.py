"""Our parameters from a bitsandbytes nf4 checkpoint: nf4 for attention and experts, float for the rest.

The sites kept in nf4 are attention q/k/v/o and every expert's w1/w3/w2 (QLoRA's frozen base). Each
keeps our parameter's orientation, packed along its last contracted axis (:mod:`mixtral_jax.quant_nf4`):
``q_DNH`` ``[L, D, N, H]`` becomes codes ``[L, D / 2, N, H]`` and absmax ``[L, D / 64, N, H]``.

Algorithm, one source tensor at a time (a unit = one layer's, or one layer-and-expert's, tensor):
  - a unit that the file holds in nf4 (always attention; experts in transformers-4 files): its codes and
    scales, ``[out, in / 2]`` and ``[out, in / 64]``, are moved into our orientation by the same
    reshape-and-transpose that maps the float ``[out, in]`` weight (the packed axis is ``in``'s fastest
    part, so each byte keeps its pair), no arithmetic;
  - a unit that the file holds in float (experts in transformers-5 files): mapped to our layout by the
    Hugging Face rules, then quantized with :func:`mixtral_jax.quant_nf4.quantize` (bnb's codes);
  - every other parameter (embedding, norms, router, LM head) is read in float, the router dequantized
    from nf4 if the file quantized it.
So the largest float array alive is one unit or one non-site parameter, never the model.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

from mixtral_jax import param_paths, quant_nf4
from mixtral_jax.checkpoint import hf
from mixtral_jax.checkpoint.bnb4 import Bnb4Source, Nf4Tensor, quantization_config
from mixtral_jax.checkpoint.layout import Plan
from mixtral_jax.config import MixtralConfig

Key = tuple[str, ...]

# our nf4 site -> its contracted axes counted from the end (valid for the stacked and the unit shape):
# the registry's quantization sites less those nf4 leaves in float (the LM head)
NF4_SITES: dict[Key, tuple[int, ...]] = {key: axes for key, axes in param_paths.quant_sites().items()
                                         if key not in quant_nf4.Nf4.skip}


def open_bnb4(directory: str) -> Bnb4Source:
  """The checked :class:`Bnb4Source` of an HF directory whose config says bitsandbytes nf4."""
  if quantization_config(directory) is None:
    raise ValueError(f"{directory}/config.json has no bitsandbytes quantization_config; load it as a float "
                     "checkpoint (quantize='nf4' quantizes it while loading)")
  return Bnb4Source(hf.open_source(directory))


def read_params(directory: str, cfg: MixtralConfig, shapes: dict[Key, tuple[int, ...]], dtype=None
                ) -> dict[Key, np.ndarray | Nf4Tensor]:
  """Every parameter of the model described by ``shapes`` (our key -> full float shape): an
  :class:`Nf4Tensor` for each of :data:`NF4_SITES`, a float array (``dtype``, default the file's) for the
  rest. Validates names and shapes against ``cfg`` first, as the float loader does."""
  source = open_bnb4(directory)
  plan = Plan(source, hf.rules(cfg, source.names()), hf.dims(cfg), shapes, directory)
  plan.validate()
  dtype = np.dtype(dtype) if dtype is not None else plan.dtype()
  out: dict[Key, np.ndarray | Nf4Tensor] = {}
  for key, shape in shapes.items():
    if key in NF4_SITES:
      out[key] = _read_site(plan, source, cfg, key, shape, dtype)
    else:
      out[key] = plan.read(key, (), dtype)
  return out


def _to_ours(key: Key, hf_xK: np.ndarray, cfg: MixtralConfig, divisor: int) -> np.ndarray:
  """A packed ``[out, in / divisor]`` array of one HF tensor in our orientation: the float rule of
  ``mixtral_jax.checkpoint.hf`` with the contracted (packed) size divided by ``divisor``."""
  D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
  name = key[-1]
  if name == "q_DNH":
    return hf_xK.reshape(N, H, D // divisor).transpose(2, 0, 1)
  if name in ("k_DKH", "v_DKH"):
    return hf_xK.reshape(K, H, D // divisor).transpose(2, 0, 1)
  if name == "o_NHD":
    return hf_xK.reshape(D, N, H // divisor).transpose(1, 2, 0)
  return hf_xK.T  # w1/w3 [F, D] -> [D, F], w2 [D, F] -> [F, D]


def _read_site(plan: Plan, source: Bnb4Source, cfg: MixtralConfig, key: Key, shape: tuple[int, ...], dtype) -> Nf4Tensor:
  """The stacked nf4 arrays of one site, filled unit by unit (see the module docstring)."""
  rule, axes = plan.rules[key], NF4_SITES[key]
  codes_shape, absmax_shape = quant_nf4.stored_shapes(shape, axes)
  codes = np.empty(codes_shape, np.uint8)
  absmax = np.empty(absmax_shape, np.float32)
  unit_codes, unit_absmax = codes_shape[rule.unit:], absmax_shape[rule.unit:]
  for idx in itertools.product(*(range(n) for n in shape[:rule.unit])):
    name = rule.tensor(*idx)
    if source.is_quantized(name):
      t = source.read_nf4(name)
      if t.codes.size != np.prod(unit_codes):
        raise ValueError(f"{source.where(name)}: nf4 tensor {name!r} has {t.codes.size} bytes of codes, expected "
                         f"{np.prod(unit_codes)} for {'.'.join(key)}; the config disagrees with the file")
      codes[idx] = _to_ours(key, t.codes, cfg, 2)
      absmax[idx] = _to_ours(key, t.absmax, cfg, quant_nf4.BLOCK)
    else:
      w = rule.to_ours(np.asarray(source.read(name)))
      source.release(name)
      c, a = quant_nf4.quantize(jnp.asarray(w), axis=axes[-1])
      codes[idx], absmax[idx] = np.asarray(c), np.asarray(a)
  return Nf4Tensor(codes, absmax, np.dtype(dtype))
