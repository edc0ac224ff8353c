"""The fine-tune command's arguments: the official trainer's names, plus every HF `TrainingArguments` option.

An official `*_lora.sh` script works by swapping its entry point for `internvl-lora finetune`. The same keys can
come from a YAML or JSON file (`--config FILE`); flags on the command line override the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser, TrainingArguments


@dataclass
class ModelArguments:
    """Which model to start from, what to freeze and where LoRA goes (official names and defaults)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "InternVL checkpoint folder (official format). None: the embedded demo."}
    )
    freeze_llm: bool = field(default=False, metadata={"help": "Freeze the LLM."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the ViT."})
    freeze_mlp: bool = field(default=False, metadata={"help": "Freeze the mlp1 projector."})
    unfreeze_vit_layers: int = field(default=0, metadata={"help": "Train the ViT layers from this index on."})
    vision_select_layer: int = field(default=-1, metadata={"help": "ViT layer whose features feed the LLM."})
    use_backbone_lora: int = field(default=0, metadata={"help": "LoRA rank on the ViT (0: none)."})
    use_llm_lora: int = field(default=0, metadata={"help": "LoRA rank on the LLM (0: none)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    unfreeze_lm_head: bool = field(default=False, metadata={"help": "Train the LLM's output head."})
    grad_checkpoint: bool = field(default=True, metadata={"help": "Gradient checkpointing in ViT and LLM."})
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth rate of the ViT."})
    ps_version: Literal["v1", "v2"] = field(default="v2", metadata={"help": "Pixel shuffle version."})
    save_full_model: bool = field(
        default=False, metadata={"help": "Also write the official-format full checkpoint (GBs) with the adapters."}
    )
    force_base_model: bool = field(
        default=False, metadata={"help": "Resume or load adapters even when the base model's config hash differs."}
    )


@dataclass
class DataArguments:
    """Where the data is and how images and text become tokens (official names and defaults)."""

    meta_path: str | None = field(default=None, metadata={"help": "Meta JSON naming the JSONL datasets."})
    conv_style: str = field(default="internlm2-chat", metadata={"help": "Conversation template."})
    max_seq_length: int = field(default=8192, metadata={"help": "Longest sample, in tokens, images included."})
    force_image_size: int = field(default=448, metadata={"help": "Tile side in pixels."})
    down_sample_ratio: float = field(default=0.5, metadata={"help": "Pixel-shuffle ratio of the ViT features."})
    pad2square: bool = field(default=False, metadata={"help": "Pad images to squares (not supported)."})
    dynamic_image_size: bool = field(default=False, metadata={"help": "Dynamic tiling of images."})
    use_thumbnail: bool = field(default=False, metadata={"help": "Add a thumbnail tile to tiled images."})
    min_dynamic_patch: int = field(default=1, metadata={"help": "Fewest tiles per image."})
    max_dynamic_patch: int = field(default=12, metadata={"help": "Most tiles per sample."})
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Skip unreadable samples (counted and reported) instead of stopping."}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


def _read_config_file(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def parse_finetune_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse `argv` (and the `--config FILE` it may name) into the three argument dataclasses."""
    if "warmup_ratio" not in TrainingArguments.__dataclass_fields__:
        # transformers 5.2x folded --warmup_ratio into --warmup_steps (a float below 1 is a ratio); official
        # scripts still pass --warmup_ratio.
        argv = ["--warmup_steps" if arg == "--warmup_ratio" else arg for arg in argv]
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument("--config", default=None, help="YAML or JSON file with any of these options")
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        values = _read_config_file(path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}")
        parser.set_defaults(**values)
    if not any(arg == "--output_dir" or arg.startswith("--output_dir=") for arg in argv):
        parser.set_defaults(output_dir=parser.get_default("output_dir") or "runs/finetune")
    # The result also holds a namespace with --config (already read above) before the leftover strings.
    model_args, data_args, training_args, _, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if rest:
        raise ValueError(f"unknown argument(s): {' '.join(rest)}")
    return model_args, data_args, training_args
