"""The fine-tune command's arguments: the official trainer's names, plus every HF `TrainingArguments` option.

An official `*_lora.sh` script works by swapping its entry point for `internvl-lora finetune`. The same keys can
come from a YAML or JSON file (`--config FILE`); flags on the command line override the file. Unless either says
otherwise, the run writes to `runs/finetune` and logs to TensorBoard (`OUTPUT_DIR/runs/`; `--report_to none`: off).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from internvl.data.templates import TEMPLATE_NAMES
from internvl.train.deepspeed_config import resolve_deepspeed_argument

# What `internvl-lora finetune` does when neither the command line nor the config file says otherwise.
DEFAULTS = {"output_dir": "runs/finetune", "report_to": "tensorboard"}


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
    lora_dropout: float | None = field(
        default=None,
        metadata={"help": "Dropout on the LoRA path (default: the official 0.05; 0 on the LLM for Qwen3-MoE and "
                          "GPT-OSS, whose fused expert weights PEFT adapts without dropout)."},
    )
    unfreeze_lm_head: bool = field(default=False, metadata={"help": "Train the LLM's output head."})
    grad_checkpoint: bool = field(default=True, metadata={"help": "Gradient checkpointing in ViT and LLM."})
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth rate of the ViT."})
    ps_version: Literal["v1", "v2"] = field(default="v2", metadata={"help": "Pixel shuffle version."})
    save_full_model: bool = field(
        default=False,
        metadata={"help": "At the end, also write the merged model, official format (GBs), to OUTPUT_DIR/full_model."},
    )
    force_base_model: bool = field(
        default=False, metadata={"help": "Resume or load adapters even when the base model's config hash differs."}
    )
    fast_lora: bool = field(
        default=True,
        metadata={"help": "On CUDA, train the LLM's LoRA through internvl.lora.fused's fused kernels (the same "
                          "adapters; PEFT's own layers on CPU, under FSDP/DeepSpeed or where unsupported)."},
    )
    recompute_mlp_only: bool = field(
        default=True,
        metadata={"help": "With --grad_checkpoint on the fast path: keep each LLM layer's activations but its MLP's "
                          "gate/up outputs (recomputed in backward) instead of checkpointing whole layers: about 2x "
                          "HF+PEFT's speed in no more memory on a 7B LLM at 4k tokens (measured). False: whole "
                          "layers, the least memory."},
    )

    def __post_init__(self):
        for name in ("use_llm_lora", "use_backbone_lora"):
            rank = getattr(self, name)
            if rank < 0:
                raise ValueError(f"--{name} {rank}: must be a LoRA rank (a positive integer), or 0 for no LoRA")


# Data arguments that count something, and what they count: below 1 they mean nothing.
POSITIVE_DATA_ARGUMENTS = {"max_seq_length": "tokens", "force_image_size": "pixels", "min_dynamic_patch": "tiles"}


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

    def __post_init__(self):
        if self.conv_style not in TEMPLATE_NAMES:
            raise ValueError(
                f"--conv_style {self.conv_style!r}: unknown conversation template; known: {', '.join(TEMPLATE_NAMES)}"
            )
        for name, unit in POSITIVE_DATA_ARGUMENTS.items():
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be a positive number of {unit}")
        if self.max_dynamic_patch < self.min_dynamic_patch:
            raise ValueError(f"--max_dynamic_patch {self.max_dynamic_patch}: must be at least --min_dynamic_patch "
                             f"({self.min_dynamic_patch})")
        if not 0 < self.down_sample_ratio <= 1:
            raise ValueError(f"--down_sample_ratio {self.down_sample_ratio}: must be in (0, 1], the factor by which "
                             "pixel shuffle shrinks each side of the ViT's feature map (officially 0.5)")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


def _read_config_file(path: str) -> dict:
    """The options of a YAML or JSON config file; ValueError naming the file (and line) when it is unusable."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise FileNotFoundError(f"--config {path}: {error.strerror or error}") from None
    try:
        values = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except yaml.MarkedYAMLError as error:
        raise ValueError(f"{path}:{error.problem_mark.line + 1}: not valid YAML: {error.problem}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got a {type(values).__name__}")
    return values


def parse_finetune_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse `argv` (and the `--config FILE` it may name) into the three argument dataclasses."""
    argv = resolve_deepspeed_argument(argv)
    if "warmup_ratio" not in TrainingArguments.__dataclass_fields__:
        # transformers 5.2x folded --warmup_ratio into --warmup_steps (a float below 1 is a ratio); official
        # scripts still pass --warmup_ratio.
        argv = ["--warmup_steps" if arg == "--warmup_ratio" else arg for arg in argv]
    # The full usage lists every TrainingArguments option: hundreds of lines in front of a one-line error.
    parser = HfArgumentParser(
        ARGUMENT_CLASSES, prog="internvl-lora finetune", usage="%(prog)s [--config FILE] [OPTIONS]"
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file with any of these options")
    parser.set_defaults(**DEFAULTS)
    config_reader = argparse.ArgumentParser(prog=parser.prog, add_help=False, allow_abbrev=False)
    config_reader.add_argument("--config")
    path = config_reader.parse_known_args(argv)[0].config
    if path is not None:
        values = _read_config_file(path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}")
        parser.set_defaults(**values)
    # The result also holds a namespace with --config (already read above) before the leftover strings.
    try:
        model_args, data_args, training_args, _, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except importlib.metadata.PackageNotFoundError as error:  # transformers checks for deepspeed here
        raise ValueError(f"{error.name.strip()} Install it, or drop the option that needs it.") from None
    if rest:
        raise ValueError(f"unknown argument(s): {' '.join(rest)}")
    return model_args, data_args, training_args
