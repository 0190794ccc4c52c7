"""mixtral-jax: the Mixtral sparse mixture-of-experts models in JAX / Flax NNX.

Public surface::

  import mixtral_jax
  model = mixtral_jax.from_pretrained(path)   # HF dir, Mistral consolidated dir, or our Orbax checkpoint
  logits = model(input_ids)                    # int32 [B, T] -> float32 [B, T, V]
  out = mixtral_jax.generate(model, ["Hello"], 64, tokenizer="v1")   # out.texts, out.tokens
"""

from mixtral_jax.chat import encode_chat, parse_tool_calls
from mixtral_jax.config import PRESETS, MixtralConfig, get_config
from mixtral_jax.generate import Generation, generate
from mixtral_jax.model import KVCache, Mixtral, init_cache
from mixtral_jax.params import create_model, param_counts
from mixtral_jax.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "MixtralConfig", "PRESETS", "get_config", "Mixtral", "KVCache", "init_cache", "create_model",
    "param_counts", "from_pretrained", "Tokenizer", "encode_chat", "parse_tool_calls", "generate", "Generation",
]


def from_pretrained(path, **kwargs):
  """Loads a model from a Hugging Face directory, a Mistral consolidated directory, or an Orbax
  checkpoint written by mixtral-jax (see :func:`mixtral_jax.checkpoint.load`). ``adapter=PATH`` merges a
  LoRA adapter (a PEFT adapter directory or a mixtral-jax LoRA run) into the weights; ``quantize="int8"``
  quantizes every matmul weight as it is read, so only the int8 model is ever held."""
  from mixtral_jax.checkpoint import load  # noqa: PLC0415  (keeps `import mixtral_jax` light)
  return load(path, **kwargs)
