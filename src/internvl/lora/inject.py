"""Inject PEFT LoRA adapters into any `nn.Module`, with the checks the official code lacks.

PEFT does the work; this module picks nothing by itself (targets come from `internvl.archs`), and adds what
users need around `get_peft_model`: argument checks, a clear error for targets that match nothing or for a
module that already carries adapters, and the trainable / total counts.
"""

from __future__ import annotations

from typing import NamedTuple

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn


class ParamCounts(NamedTuple):
    """Trainable and total parameter counts of a module."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """Trainable share in percent."""
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} ({self.share:.2f}%)"


def count_params(module: nn.Module) -> ParamCounts:
    """Count the trainable and all parameters of `module` (under DeepSpeed ZeRO-3, full sizes, not local shards)."""
    sizes = [(p.requires_grad, getattr(p, "ds_numel", p.numel())) for p in module.parameters()]
    return ParamCounts(sum(size for trains, size in sizes if trains), sum(size for _, size in sizes))


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def check_targets(module: nn.Module, target_modules, target_parameters=()) -> None:
    """Raise ValueError naming every target (module or parameter suffix) that matches nothing in `module`."""
    module_names = [name for name, _ in module.named_modules()]
    param_names = [name for name, _ in module.named_parameters()]
    missing = [t for t in target_modules if not any(_matches(n, t) for n in module_names)]
    missing += [t for t in target_parameters if not any(_matches(n, t) for n in param_names)]
    if missing:
        linear = sorted({n.split(".")[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA target(s) {missing} match no module of {type(module).__name__}; "
            f"its linear layers are named: {', '.join(linear)}"
        )


def add_lora(
    module: nn.Module,
    target_modules,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_parameters=(),
    task_type: str | None = None,
    **peft_options,
) -> PeftModel:
    """Wrap `module` in a `PeftModel` with LoRA on the given targets; only LoRA weights stay trainable.

    `peft_options` go to `peft.LoraConfig` unchanged (`use_dora`, `use_rslora`, `init_lora_weights`, ...).
    """
    if isinstance(module, PeftModel):
        raise ValueError(
            f"{type(module.get_base_model()).__name__} already carries LoRA adapters (r={lora_rank(module)}); "
            "wrapping again would nest them. Merge them first (`internvl-lora merge`) or start from the base "
            "checkpoint."
        )
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    target_modules, target_parameters = list(target_modules), list(target_parameters)
    if target_parameters and lora_dropout:
        raise ValueError(
            f"PEFT's LoRA on fused expert weights {target_parameters} has no dropout; pass lora_dropout=0, "
            "or target_modules=[...] to adapt only the attention projections with dropout"
        )
    check_targets(module, target_modules, target_parameters)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        task_type=task_type,
        **peft_options,
    )
    return get_peft_model(module, config)


def lora_rank(module: nn.Module) -> int:
    """The LoRA rank of a PEFT-wrapped module, 0 when it carries no adapter."""
    if not isinstance(module, PeftModel):
        return 0
    return next(iter(module.peft_config.values())).r
