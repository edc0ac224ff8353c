"""The fine-tune command's arguments: the official trainers' names, plus every HF `TrainingArguments` option.

An official `*_lora.sh` (or InternVL3.5 `*_sft.sh`) script works by swapping its entry point for `internvl-lora
finetune`: every argument of both official trainers is accepted with its official name and default, and the
transformers-4 names those scripts pass (`--evaluation_strategy`, `--overwrite_output_dir`, `--group_by_length`)
keep their official meaning on transformers 5. The image and template settings default to the checkpoint's own
(`config.json`) where the command line is silent. The same keys can come from a YAML or JSON file (`--config FILE`);
flags on the command line override the file. Unless either says otherwise, the run writes to `runs/finetune` and
logs to TensorBoard (`OUTPUT_DIR/runs/`; `--report_to none`: off).
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
from transformers.hf_argparser import string_to_bool

from internvl.data.constants import MAX_NUM_FRAME, MIN_NUM_FRAME
from internvl.data.templates import TEMPLATE_NAMES
from internvl.train.deepspeed_config import resolve_deepspeed_argument

# What `internvl-lora finetune` does when neither the command line nor the config file says otherwise.
DEFAULTS = {"output_dir": "runs/finetune", "report_to": "tensorboard"}


@dataclass
class ModelArguments:
    """Which model to start from, what to freeze and where LoRA goes (official names and defaults)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "InternVL checkpoint folder (official format). None: the embedded demo, "
                                        "or a model assembled from --vision_path and --llm_path."}
    )
    vision_path: str | None = field(
        default=None, metadata={"help": "With --llm_path instead of --model_name_or_path: an InternViT folder."}
    )
    llm_path: str | None = field(
        default=None, metadata={"help": "With --vision_path: the LLM folder (its tokenizer too); mlp1 starts fresh."}
    )
    mlp_path: str | None = field(
        default=None, metadata={"help": "A saved mlp1 state dict (the official projector file) loaded into mlp1."}
    )
    freeze_llm: bool = field(default=False, metadata={"help": "Freeze the LLM."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the ViT."})
    freeze_mlp: bool = field(default=False, metadata={"help": "Freeze the mlp1 projector."})
    unfreeze_vit_layers: int = field(default=0, metadata={"help": "Train the ViT layers from this index on."})
    vision_select_layer: int | None = field(
        default=None, metadata={"help": "ViT layer whose features feed the LLM (default: the checkpoint's)."}
    )
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
    ps_version: Literal["v1", "v2"] | None = field(
        default=None, metadata={"help": "Pixel shuffle version (default: the checkpoint's)."}
    )
    use_fast_tokenizer: bool = field(
        default=False, metadata={"help": "Official name; transformers 5 has one tokenizer class per family: "
                                         "both values load it (InternLM2's is ours, as the official slow one)."}
    )
    use_liger: bool = field(
        default=False, metadata={"help": "Official name: Liger kernels. The fused fast path (--fast_lora, on by "
                                         "default on CUDA) fuses the same operations and more."}
    )
    use_custom_flash_attn: bool = field(
        default=False, metadata={"help": "Official (InternVL3.5) name: GPT-OSS's flash sink attention; attention "
                                         "here runs on torch's kernels (GPT-OSS: eager, for its sinks)."}
    )
    overwrite_output_dir: bool | None = field(
        default=None,
        metadata={"help": "Official (transformers 4) name. True: start afresh in --output_dir, never resume. False: "
                          "resume from its last checkpoint, and refuse a non-empty folder without one. Unset: resume "
                          "when there is a checkpoint."},
    )
    save_full_model: bool = field(
        default=False,
        metadata={"help": "At the end, also write the merged model, official format (GBs), to OUTPUT_DIR/full_model."},
    )
    force_base_model: bool = field(
        default=False, metadata={"help": "Resume or load adapters even when the base model's config hash differs."}
    )
    fast_lora: bool = field(
        default=True,
        metadata={"help": "On CUDA, train the LLM's LoRA through internvl.lora.fast's fused modules (the same "
                          "adapters; PEFT's own layers on CPU, under FSDP/DeepSpeed or where unsupported)."},
    )
    recompute_mlp_only: bool | None = field(
        default=None,
        metadata={"help": "With --grad_checkpoint on the fast path: True keeps every LLM layer's activations but its "
                          "MLP's gate/up outputs (recomputed in backward); False checkpoints whole layers, the least "
                          "memory. Default: the plan that fits --memory_budget_gib, fitted on the GPU at the start."},
    )
    memory_budget_gib: float | None = field(
        default=None,
        metadata={"help": "Peak GPU memory the fast path's checkpoint plan may use on the run's largest batch "
                          "(default: what HF + PEFT with every layer checkpointed needs for that batch, measured)."},
    )

    def __post_init__(self):
        for name in ("use_llm_lora", "use_backbone_lora"):
            rank = getattr(self, name)
            if rank < 0:
                raise ValueError(f"--{name} {rank}: must be a LoRA rank (a positive integer), or 0 for no LoRA")


# Data arguments that count something, and what they count: below 1 they mean nothing.
POSITIVE_DATA_ARGUMENTS = {"max_seq_length": "tokens", "force_image_size": "pixels", "min_dynamic_patch": "tiles",
                           "min_num_frame": "frames"}


@dataclass
class DataArguments:
    """Where the data is and how images and text become tokens (official names and defaults)."""

    meta_path: str | None = field(default=None, metadata={"help": "Meta JSON naming the JSONL datasets."})
    conv_style: str | None = field(
        default=None, metadata={"help": "Conversation template (default: the checkpoint's)."}
    )
    max_seq_length: int = field(default=8192, metadata={"help": "Longest sample, in tokens, images included."})
    force_image_size: int | None = field(
        default=None, metadata={"help": "Tile side in pixels (default: the checkpoint's)."}
    )
    down_sample_ratio: float | None = field(
        default=None, metadata={"help": "Pixel-shuffle ratio of the ViT features (default: the checkpoint's)."}
    )
    pad2square: bool = field(
        default=False, metadata={"help": "Without dynamic tiling, pad each image to a square of the mean colour "
                                         "before resizing it (not data_augment datasets), as officially."}
    )
    dynamic_image_size: bool | None = field(
        default=None, metadata={"help": "Dynamic tiling of images (default: the checkpoint's)."}
    )
    use_thumbnail: bool | None = field(
        default=None, metadata={"help": "Add a thumbnail tile to tiled images (default: the checkpoint's)."}
    )
    min_dynamic_patch: int | None = field(
        default=None, metadata={"help": "Fewest tiles per image (default: the checkpoint's)."}
    )
    max_dynamic_patch: int | None = field(
        default=None, metadata={"help": "Most tiles per sample (default: the checkpoint's)."}
    )
    normalize_type: Literal["imagenet", "clip", "siglip"] = field(
        default="imagenet", metadata={"help": "Mean and std the tiles are normalised with."}
    )
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Skip unreadable samples (counted and reported) instead of stopping."}
    )
    use_data_resampling: bool = field(
        default=False, metadata={"help": "Official name: sqrt-of-size dataset weights, which the official trainer "
                                         "applies to packed datasets only."}
    )
    split_annotations: bool = field(
        default=False, metadata={"help": "Official (InternVL3.5) name: each rank holds only its share of the "
                                         "annotation lines. Here they are read lazily (16 bytes a line) anyway."}
    )
    min_num_frame: int = field(default=MIN_NUM_FRAME, metadata={"help": "Fewest frames sampled from a video."})
    max_num_frame: int = field(default=MAX_NUM_FRAME, metadata={"help": "Most frames sampled from a video."})
    use_packed_ds: bool = field(
        default=False, metadata={"help": "Pack samples into rows of at most --max_packed_tokens tokens (each sample "
                                         "attends only to itself); a stream without a length: give --max_steps."}
    )
    num_images_expected: int = field(default=40, metadata={"help": "Packing: most images per packed row."})
    max_packed_tokens: int = field(default=8192, metadata={"help": "Packing: tokens per packed row."})
    max_buffer_size: int = field(default=20, metadata={"help": "Packing: partial rows held at once."})
    log_freq: int = field(default=1000, metadata={"help": "Packing: log the buffer every this many samples."})
    strict_mode: bool = field(default=True, metadata={"help": "Packing: pad rows to the expected images/tokens."})
    replacement: bool = field(default=False, metadata={"help": "Packing: restart a dataset once exhausted."})
    allow_overflow: bool = field(default=False, metadata={"help": "Packing: merge past the token budget, then split."})
    loss_reduction: Literal["token", "sample", "square"] = field(
        default="token", metadata={"help": "Each token's loss weight, 1, 1/n or 1/sqrt(n) for a sample of n answer "
                                           "tokens; padded or packed alike (officially: packed batches only)."}
    )
    loss_reduction_all_gather: bool = field(
        default=False, metadata={"help": "Sum the loss weights over the ranks (here: transformers' "
                                         "--average_tokens_across_devices, on by default)."}
    )
    eval_meta_path: str | None = field(
        default=None,
        metadata={"help": "Meta JSON of held-out data: its loss is logged per --eval_strategy, and at the end the "
                          "loss and generation metrics go to OUTPUT_DIR/eval."},
    )

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse values that mean nothing (settings still None come from the checkpoint, and are checked then)."""
        if self.conv_style is not None and self.conv_style not in TEMPLATE_NAMES:
            raise ValueError(
                f"--conv_style {self.conv_style!r}: unknown conversation template; known: {', '.join(TEMPLATE_NAMES)}"
            )
        for name, unit in POSITIVE_DATA_ARGUMENTS.items():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value}: must be a positive number of {unit}")
        tiles = (self.min_dynamic_patch, self.max_dynamic_patch)
        if None not in tiles and self.max_dynamic_patch < self.min_dynamic_patch:
            raise ValueError(f"--max_dynamic_patch {self.max_dynamic_patch}: must be at least --min_dynamic_patch "
                             f"({self.min_dynamic_patch})")
        if self.max_num_frame < self.min_num_frame:
            raise ValueError(f"--max_num_frame {self.max_num_frame}: must be at least --min_num_frame "
                             f"({self.min_num_frame})")
        if self.down_sample_ratio is not None and not 0 < self.down_sample_ratio <= 1:
            raise ValueError(f"--down_sample_ratio {self.down_sample_ratio}: must be in (0, 1], the factor by which "
                             "pixel shuffle shrinks each side of the ViT's feature map (officially 0.5)")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)

# Settings whose default is the checkpoint's own: argument -> the config field (and `ServingSettings` field).
CHECKPOINT_SETTINGS = {
    "conv_style": "template",
    "force_image_size": "force_image_size",
    "down_sample_ratio": "downsample_ratio",
    "dynamic_image_size": "dynamic_image_size",
    "use_thumbnail": "use_thumbnail",
    "min_dynamic_patch": "min_dynamic_patch",
    "max_dynamic_patch": "max_dynamic_patch",
    "ps_version": "ps_version",
    "vision_select_layer": "select_layer",
}


# The official trainer's defaults of those settings: what a model assembled from parts (--vision_path, --llm_path)
# starts with, having no checkpoint of its own.
OFFICIAL_DEFAULTS = {"conv_style": "internlm2-chat", "force_image_size": 448, "down_sample_ratio": 0.5,
                     "dynamic_image_size": False, "use_thumbnail": False, "min_dynamic_patch": 1,
                     "max_dynamic_patch": 12, "ps_version": "v2", "vision_select_layer": -1}


def official_option_notes(model_args: ModelArguments, data_args: DataArguments) -> list[str]:
    """A line for each official option set to a value that changes nothing here, saying why: accepted, so that an
    official script runs unchanged, but never silently."""
    notes = []
    if model_args.use_liger:
        notes.append("--use_liger True: nothing to add: on CUDA the fused fast path (--fast_lora, on by default) "
                     "fuses what Liger's kernels would")
    if model_args.use_custom_flash_attn:
        notes.append("--use_custom_flash_attn True: attention runs on torch's kernels (sdpa; eager for GPT-OSS's "
                     "attention sinks)")
    if data_args.split_annotations:
        notes.append("--split_annotations True: annotation lines are read lazily (16 bytes a line in memory), and "
                     "each rank draws its share through the distributed sampler")
    if data_args.use_data_resampling:
        notes.append("--use_data_resampling True: every sample is drawn once per pass (each dataset in proportion "
                     "to its size, repeat_time included), not by sqrt-of-size weights")
    if data_args.loss_reduction != "token" and not data_args.use_packed_ds:
        notes.append(f"--loss_reduction {data_args.loss_reduction}: weighs padded batches too (officially packed "
                     "ones only), so that packing never changes the objective")
    if data_args.loss_reduction_all_gather:
        notes.append("--loss_reduction_all_gather True: the loss divisor is summed over the ranks, as transformers' "
                     "--average_tokens_across_devices (on by default) does")
    if data_args.use_packed_ds and data_args.allow_overflow:
        notes.append("--allow_overflow True: changes nothing: a sample is never cut across packs here, so no pack "
                     "goes past --max_packed_tokens to be split afterwards")
    return notes


def _holder(model_args: ModelArguments, data_args: DataArguments, argument: str):
    """The dataclass that holds `argument` (the model settings live in ModelArguments, the rest in DataArguments)."""
    return model_args if hasattr(model_args, argument) else data_args


def fill_unset(model_args: ModelArguments, data_args: DataArguments, values: dict) -> dict:
    """Set each argument of `values` (by name) that the command line left unset (None); returns what was set. An
    explicit flag wins, as officially."""
    taken = {}
    for argument, value in values.items():
        args = _holder(model_args, data_args, argument)
        if getattr(args, argument) is None:
            setattr(args, argument, value)
            taken[argument] = value
    data_args.check()
    return taken


def chosen_settings(model_args: ModelArguments, data_args: DataArguments) -> dict:
    """The value of each of `CHECKPOINT_SETTINGS`, keyed by its config field (as `ServingSettings` and
    `InternVLChatConfig` name it)."""
    return {field: getattr(_holder(model_args, data_args, argument), argument)
            for argument, field in CHECKPOINT_SETTINGS.items()}


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


def _transformers4_renames() -> dict[str, str]:
    """The transformers-4 option names official scripts pass that this transformers calls otherwise."""
    fields = TrainingArguments.__dataclass_fields__
    renames = {"evaluation_strategy": "eval_strategy"}
    if "warmup_ratio" not in fields:  # transformers 5.2x: --warmup_steps below 1 is a ratio
        renames["warmup_ratio"] = "warmup_steps"
    return {old: new for old, new in renames.items() if old not in fields}


def transformers4_names(argv: list[str]) -> list[str]:
    """`argv` with the transformers-4 options the official scripts pass spelled as this transformers takes them:
    `--evaluation_strategy` is `--eval_strategy`, `--group_by_length B` is `--train_sampling_strategy
    group_by_length` (nothing when B is false), `--warmup_ratio` is `--warmup_steps` where that took it over."""
    renames = {f"--{old}": f"--{new}" for old, new in _transformers4_renames().items()}
    grouping = "group_by_length" not in TrainingArguments.__dataclass_fields__
    out, i = [], 0
    while i < len(argv):
        if grouping and argv[i] == "--group_by_length":
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if string_to_bool(argv[i + 1]) if has_value else True:
                out += ["--train_sampling_strategy", "group_by_length"]
            i += 2 if has_value else 1
            continue
        out.append(renames.get(argv[i], argv[i]))
        i += 1
    return out


def _transformers4_keys(values: dict) -> dict:
    """A config file's options with the transformers-4 names as `transformers4_names` translates them."""
    renames = _transformers4_renames()
    out = {renames.get(key, key): value for key, value in values.items() if key != "group_by_length"}
    if "group_by_length" in values and "group_by_length" not in TrainingArguments.__dataclass_fields__:
        if string_to_bool(str(values["group_by_length"])):
            out["train_sampling_strategy"] = "group_by_length"
    return out


def parse_finetune_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse `argv` (and the `--config FILE` it may name) into the three argument dataclasses."""
    argv = transformers4_names(resolve_deepspeed_argument(argv))
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
        values = _transformers4_keys(_read_config_file(path))
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
    if "--do_train" in argv and not training_args.do_train:
        raise ValueError("--do_train False: this command trains; there is nothing else for it to do")
    return model_args, data_args, training_args
