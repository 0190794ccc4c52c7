"""Checkpoint I/O: Hugging Face and Mistral consolidated files in, our Orbax format in and out, and
Hugging Face safetensors back out.

  load(path, mesh=None, dtype=None, param_dtype=None, **runtime) -> Mixtral   any of the three formats
  load_config(path) -> MixtralConfig
  find_tokenizer(path) -> str | None
  save(model, dst)                 our format from a model in memory
  convert(src, dst)                HF / consolidated -> our format, streaming one layer at a time
  export(ckpt, dst)                our format (or a training run) -> HF safetensors, streaming
"""

from mixtral_jax.checkpoint.convert import convert, save
from mixtral_jax.checkpoint.export import export
from mixtral_jax.checkpoint.formats import detect, find_tokenizer
from mixtral_jax.checkpoint.loading import load, load_config

__all__ = ["load", "load_config", "find_tokenizer", "save", "convert", "export", "detect"]
