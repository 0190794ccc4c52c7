"""LoRA: low-rank adapters on a frozen base, per expert on the MoE weights, with PEFT adapters in and out.

  spec       the run config's ``lora`` section (rank, alpha, dropout, targets), checks, base fingerprint
  adapters   the adapter variables inside the model and how the forward pass applies them
  merge      adapters from a PEFT directory or a LoRA training run, merged into a base model's weights
  peft_io    our adapters <-> Hugging Face PEFT ``adapter_config.json`` + ``adapter_model.safetensors``
  run        a LoRA training run's record of its base (``WORKDIR/lora.json``) and its adapters
"""

from mixtral_jax.lora.adapters import LoRAParam, init_values
from mixtral_jax.lora.spec import DEFAULT_TARGETS, TARGETS, LoraSection, fingerprint, validate

__all__ = ["LoraSection", "LoRAParam", "TARGETS", "DEFAULT_TARGETS", "validate", "fingerprint", "init_values"]
