"""Hugging Face checkpoints quantized by bitsandbytes to nf4: read straight into our nf4 layout.

What such a directory holds (``config.json`` has ``quantization_config.quant_method = "bitsandbytes"``,
``load_in_4bit``, ``bnb_4bit_quant_type = "nf4"``). Each quantized ``nn.Linear`` weight ``W [out, in]``
is saved as

  NAME                                         uint8, the packed codes (bnb's flat buffer, ``[out*in/2, 1]``;
                                               another dtype when ``bnb_4bit_quant_storage`` was set: its bytes)
  NAME.absmax                                  float32 ``[blocks]`` - or uint8 when the scales were
                                               double-quantized, with:
  NAME.nested_absmax, NAME.nested_quant_map    float32 ``[blocks / 256]``, ``[256]`` (8-bit dynamic code)
  NAME.quant_map                               float32 ``[16]``, the 4-bit codebook
  NAME.quant_state.bitsandbytes__nf4           uint8, a JSON dict: quant_type, blocksize, dtype, shape
                                               (and nested_blocksize, nested_offset, nested_dtype)

Two layouts occur for Mixtral:
  - files written by transformers 4 quantize every ``nn.Linear``: attention, every expert's w1/w2/w3
    and the router ``block_sparse_moe.gate`` (the LM head is skipped);
  - files written by transformers 5 quantize attention only: its experts are fused parameters, which
    bitsandbytes leaves in float (saved back per expert or fused).
The router is read back to float (:meth:`Bnb4Source.read` dequantizes any quantized tensor with bnb's
arithmetic); the attention and expert weights stay nf4.

Algorithm: one tensor at a time, the codes' bytes are reshaped (no arithmetic) to
``[..., in / 2]`` and the scales to ``[..., in / block]`` (see :mod:`mixtral_jax.quant_nf4`); double-
quantized scales are expanded once to float32 exactly as bitsandbytes' ``dequantize_4bit`` does
(``nested_quant_map[q] * nested_absmax[i // nested_blocksize] + nested_offset``, float32), so our
dequantization of what we read equals bitsandbytes' to the last bit. Nothing is ever held in float
beyond the one tensor being read.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from mixtral_jax import quant_nf4
from mixtral_jax.checkpoint.safetensors_io import SafetensorsSource

QUANT_KEY = "quant_method"
STATE = ".quant_state.bitsandbytes__"
COMPANIONS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
INT8_COMPANIONS = (".SCB", ".weight_format")  # bitsandbytes LLM.int8() (load_in_8bit) files
FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


class Nf4Tensor(NamedTuple):
  """One weight in our nf4 layout: ``codes`` uint8 ``[..., K / 2]``, ``absmax`` float32 ``[..., K / block]``,
  blocks along the last (contracted) axis; ``dtype`` is the float type it was quantized from."""
  codes: np.ndarray
  absmax: np.ndarray
  dtype: np.dtype


def quantization_config(directory: str) -> dict | None:
  """``config.json``'s ``quantization_config`` if it says bitsandbytes, after checking it is a 4-bit nf4
  one; None for an unquantized checkpoint."""
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    qc = json.load(f).get("quantization_config")
  if not qc or qc.get(QUANT_KEY) != "bitsandbytes":
    return None
  if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
    raise ValueError(f"{path}: quantization_config is bitsandbytes 8-bit (load_in_8bit), which is not read; "
                     "use the float checkpoint with quantize='int8', or a 4-bit nf4 one")
  if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
    raise ValueError(f"{path}: quantization_config has bnb_4bit_quant_type={qc.get('bnb_4bit_quant_type', 'fp4')!r};"
                     " only nf4 is read: re-quantize with bnb_4bit_quant_type='nf4' or use the float checkpoint")
  return qc


def _bnb_float_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  if name not in FLOAT_DTYPES:
    raise KeyError(name)
  return FLOAT_DTYPES[name]


class Bnb4Source:
  """The tensors of a bitsandbytes nf4 checkpoint by *weight* name (the quant-state companions hidden).

  It is a ``TensorSource`` (names/shape/dtype/read/release/where) in which a quantized weight has its
  float shape and dtype and ``read`` dequantizes it; :meth:`read_nf4` gives the same weight in our nf4
  layout instead. Opening checks every quantized weight's companions and raises, naming the file and the
  tensor, for fp4, 8-bit or missing quant-state tensors."""

  def __init__(self, source: SafetensorsSource):
    self.source = source
    self.states: dict[str, dict] = {}
    every = set(source.names())
    for name in sorted(every):
      self._check_foreign(name, every)
      if STATE in name:
        weight, kind = name.split(STATE)
        if kind != "nf4":
          raise ValueError(f"{source.where(name)}: tensor {weight!r} is bitsandbytes {kind} 4-bit; only nf4 is "
                           "read: re-quantize with bnb_4bit_quant_type='nf4' or use the float checkpoint")
        self.states[weight] = self._state(weight, every)
    for name in every:
      base = next((name[:-len(s)] for s in COMPANIONS if name.endswith(s)), None)
      if base is not None and base not in self.states and base in every:
        raise ValueError(f"{source.where(name)}: tensor {base!r} has {name[len(base):]} but no "
                         f"'{base}{STATE}nf4' quant state; the file is incomplete: re-save it with bitsandbytes")
    self._names = [n for n in source.names() if STATE not in n and not n.endswith(COMPANIONS)]

  def _check_foreign(self, name: str, every: set[str]) -> None:
    """8-bit companions, or a uint8 weight with no quant state at all, are refused by name."""
    where = self.source.where(name)
    if name.endswith(INT8_COMPANIONS):
      raise ValueError(f"{where}: tensor {name!r} belongs to a bitsandbytes 8-bit (LLM.int8) weight, which is not"
                       " read; use the float checkpoint with quantize='int8', or a 4-bit nf4 one")
    if (self.source.dtype(name) == np.uint8 and STATE not in name and not name.endswith(COMPANIONS)
        and not any(n.startswith(name + STATE) for n in every)):
      raise ValueError(f"{where}: tensor {name!r} is uint8 but has no '{name}{STATE}nf4' quant state; "
                       "the bitsandbytes quant state is missing: re-save the checkpoint with bitsandbytes")

  def _state(self, weight: str, every: set[str]) -> dict:
    where = self.source.where(weight + STATE + "nf4")
    raw = self.source.read(weight + STATE + "nf4")
    try:
      state = json.loads(bytes(np.asarray(raw, np.uint8)).decode())
      state["shape"] = tuple(int(s) for s in state["shape"])
      state["blocksize"] = int(state["blocksize"])
      state["np_dtype"] = _bnb_float_dtype(state["dtype"])
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{where}: the quant state of {weight!r} is unreadable ({e!r}); re-save it with "
                       "bitsandbytes") from None
    need = [weight, weight + ".absmax", weight + ".quant_map"]
    # uint8 scales mean double quantization: then the 8-bit code and its scales must be there too
    if weight + ".absmax" in every and self.source.dtype(weight + ".absmax") == np.uint8:
      need += [weight + ".nested_absmax", weight + ".nested_quant_map"]
      state["nested"] = True
    missing = [n for n in need if n not in every]
    if missing:
      raise ValueError(f"{where}: tensor {weight!r} lacks {', '.join(missing)}; the bitsandbytes quant state is "
                       "incomplete: re-save the checkpoint with bitsandbytes")
    code = np.asarray(self.source.read(weight + ".quant_map"), np.float32)
    if code.shape != (16,) or not np.array_equal(code.view(np.uint32), quant_nf4.CODE.view(np.uint32)):
      raise ValueError(f"{self.source.where(weight + '.quant_map')}: {weight}.quant_map is not the NF4 codebook; "
                       "only bitsandbytes nf4 is read")
    quant_nf4.check_shape(state["shape"], state["blocksize"], what=f"{where}: {weight!r}")
    return state

  # --- TensorSource
  def names(self) -> list[str]:
    return list(self._names)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.states[name]["shape"] if name in self.states else self.source.shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self.states[name]["np_dtype"] if name in self.states else self.source.dtype(name)

  def read(self, name: str) -> np.ndarray:
    """A float tensor; quantized weights are dequantized to their saved dtype (bnb's arithmetic)."""
    if name not in self.states:
      return self.source.read(name)
    t = self.read_nf4(name)
    return np.asarray(quant_nf4.dequantize(t.codes, t.absmax, t.dtype))

  def release(self, name: str) -> None:
    for n in (name,) + tuple(name + s for s in COMPANIONS):
      if n in set(self.source.names()):
        self.source.release(n)

  def where(self, name: str) -> str:
    return self.source.where(name)

  # --- nf4
  def is_quantized(self, name: str) -> bool:
    return name in self.states

  def read_nf4(self, name: str) -> Nf4Tensor:
    """Weight ``name`` as codes ``[out, in / 2]`` and float32 absmax ``[out, in / block]`` (copies)."""
    state = self.states[name]
    shape, block = state["shape"], state["blocksize"]
    raw = self.source.read(name)
    codes = np.frombuffer(np.ascontiguousarray(raw).tobytes(), np.uint8)  # any quant_storage: its bytes
    if codes.size * 2 != np.prod(shape):
      raise ValueError(f"{self.where(name)}: tensor {name!r} holds {codes.size} bytes of codes, but its quant "
                       f"state says shape {list(shape)} ({np.prod(shape) // 2} bytes); the file is corrupt")
    absmax = self._absmax(name, state)
    if absmax.size * block != np.prod(shape):
      raise ValueError(f"{self.where(name)}: {name}.absmax has {absmax.size} scales, expected "
                       f"{np.prod(shape) // block} for shape {list(shape)} in blocks of {block}; the file is corrupt")
    out = Nf4Tensor(codes.reshape(*shape[:-1], shape[-1] // 2).copy(),
                    absmax.reshape(*shape[:-1], shape[-1] // block), state["np_dtype"])
    self.release(name)
    return out

  def _absmax(self, name: str, state: dict) -> np.ndarray:
    """float32 scales; double-quantized ones expanded with bnb's float32 arithmetic."""
    if not state.get("nested"):
      return np.array(self.source.read(name + ".absmax"), np.float32)
    q = np.asarray(self.source.read(name + ".absmax"), np.uint8)
    code2 = np.asarray(self.source.read(name + ".nested_quant_map"), np.float32)
    scale2 = np.asarray(self.source.read(name + ".nested_absmax"), np.float32)
    block2 = int(state["nested_blocksize"])
    expanded = code2[q] * np.repeat(scale2, block2)[:q.size]
    return (expanded + np.float32(state["nested_offset"])).astype(np.float32)
