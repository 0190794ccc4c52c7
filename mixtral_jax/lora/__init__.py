"""LoRA: low-rank adapters on a frozen base, per expert on the MoE weights, with PEFT adapters in and out.

  spec       the run config's ``lora`` section (rank, alpha, dropout, targets), checks, base fingerprint
  adapters   the adapter variables inside the model and how the forward pass applies them
  factors    one adapter outside the model: A, B and a scale per target (``Factors``), its keys and checks
  merge      adapters from a PEFT directory or a LoRA training run, merged into a base model's weights
  peft_io    our adapters <-> Hugging Face PEFT ``adapter_config.json`` + ``adapter_model.safetensors``
  run        a LoRA training run's record of its base (``WORKDIR/lora.json``) and its adapters
  export     ``mixtral-jax export RUN DST --merge | --peft``
  bank       many adapters served at once, unmerged: their factors side by side, each row its own adapter

Imports go one way: spec <- adapters <- factors <- peft_io <- merge <- export (run beside them, from
spec; bank on factors, reaching merge inside functions). The model imports ``adapters`` only; merge and
export reach the model and ``checkpoint`` inside functions, and nothing in the model imports them back.
"""

from mixtral_jax.lora.adapters import LoRAParam, init_values
from mixtral_jax.lora.spec import DEFAULT_TARGETS, TARGETS, LoraSection, fingerprint, validate

__all__ = ["LoraSection", "LoRAParam", "TARGETS", "DEFAULT_TARGETS", "validate", "fingerprint", "init_values"]
