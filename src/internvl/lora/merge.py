"""Fold LoRA adapters back into the weights they adapt."""

from __future__ import annotations

from peft import PeftModel
from torch import nn


def merge_lora(module: nn.Module) -> nn.Module:
    """Return `module` with its LoRA deltas added into the base weights and the PEFT wrapper removed.

    A module without adapters comes back unchanged. PEFT's safe merge refuses a delta that turns a weight
    NaN or infinite, so a diverged adapter never silently corrupts a merged model.
    """
    if not isinstance(module, PeftModel):
        return module
    return module.merge_and_unload(safe_merge=True)
