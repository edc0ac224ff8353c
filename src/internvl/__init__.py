"""internvl-lora: LoRA fine-tuning of InternVL chat models, compatible with the official checkpoints."""

__version__ = "0.1.0"
