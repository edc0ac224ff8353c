"""What a model is and what a LoRA run on it costs, computed on the meta device so no weight is read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from internvl.archs import VISION_LORA_TARGETS, llm_arch
from internvl.model.chat_config import InternVLChatConfig
from internvl.model.internvl_chat import InternVLChatModel

# Bytes per parameter of a bf16 LoRA run with AdamW, as the official recipe trains (DeepSpeed bf16):
# frozen weights in bf16; each trainable weight in bf16 plus its bf16 gradient, an fp32 master copy and two
# fp32 Adam moments.
FROZEN_BYTES = 2
TRAINABLE_BYTES = {"LoRA weights": 2, "gradients": 2, "optimizer states": 12}


@dataclass
class ModelSummary:
    """Parameter counts per part, LoRA targets and the memory estimate of one configuration."""

    llm_architecture: str
    template: str
    num_image_token: int
    parts: dict[str, int]  # part name -> parameters, adapters excluded
    lora_targets: dict[str, list[str]]  # part name -> module suffixes that get LoRA
    lora_modules: dict[str, int]  # part name -> number of wrapped modules or parameters
    trainable: int
    memory_bytes: dict[str, int]

    @property
    def total(self) -> int:
        """Parameters of the base model."""
        return sum(self.parts.values())


def _count(module: torch.nn.Module, adapters: bool) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if ("lora_" in n) == adapters)


def summarize(config: InternVLChatConfig, llm_lora: int = 0, backbone_lora: int = 0) -> ModelSummary:
    """Build the model of `config` on the meta device, add LoRA of the given ranks, and count."""
    config.use_llm_lora = config.use_backbone_lora = 0
    with torch.device("meta"):
        model = InternVLChatModel(config)
        if backbone_lora:
            model.wrap_backbone_lora(r=backbone_lora, lora_alpha=2 * backbone_lora, verbose=False)
        if llm_lora:
            model.wrap_llm_lora(r=llm_lora, lora_alpha=2 * llm_lora, verbose=False)
    parts = {name: _count(getattr(model, name), adapters=False) for name in ("vision_model", "mlp1", "language_model")}
    arch = llm_arch(config.llm_architecture)
    targets, wrapped = {}, {}
    if backbone_lora:
        targets["vision_model"] = list(VISION_LORA_TARGETS)
        wrapped["vision_model"] = sum(1 for n, _ in model.vision_model.named_modules() if n.endswith(".lora_A"))
    if llm_lora:
        targets["language_model"] = list(arch.lora_targets + arch.lora_target_parameters)
        wrapped["language_model"] = sum(1 for n, _ in model.language_model.named_modules() if n.endswith(".lora_A"))
    trainable = _count(model, adapters=True)
    memory = {"frozen weights (bf16)": FROZEN_BYTES * sum(parts.values())}
    memory.update({name: size * trainable for name, size in TRAINABLE_BYTES.items()})
    return ModelSummary(
        llm_architecture=config.llm_architecture,
        template=model.template,
        num_image_token=model.num_image_token,
        parts=parts,
        lora_targets=targets,
        lora_modules=wrapped,
        trainable=trainable,
        memory_bytes=memory,
    )


def _gib(size: int) -> str:
    return f"{size / 1024**3:,.2f} GiB"


def format_summary(name: str, summary: ModelSummary) -> str:
    """A human-readable report of `summary`."""
    lines = [
        f"model: {name}",
        f"LLM: {summary.llm_architecture}   template: {summary.template}   "
        f"image tokens per tile: {summary.num_image_token}",
        "parameters:",
    ]
    lines += [f"  {part:<15}{count:>18,}" for part, count in summary.parts.items()]
    lines.append(f"  {'total':<15}{summary.total:>18,}")
    for part, targets in summary.lora_targets.items():
        lines.append(f"LoRA on {part}: {', '.join(targets)} ({summary.lora_modules[part]} adapters)")
    share = 100.0 * summary.trainable / max(summary.total, 1)
    lines.append(f"trainable: {summary.trainable:,} of {summary.total + summary.trainable:,} ({share:.3f}%)")
    lines.append("memory of a LoRA run (ESTIMATE; activations not included, they grow with sequence length):")
    lines += [f"  {what:<24}{_gib(size):>14}" for what, size in summary.memory_bytes.items()]
    lines.append(f"  {'total':<24}{_gib(sum(summary.memory_bytes.values())):>14}")
    return "\n".join(lines)
