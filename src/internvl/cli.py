"""The `internvl-lora` command line: a thin layer over functions importable from Python."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _load_config(model: str):
    """An `InternVLChatConfig` from a checkpoint folder or the name of an official model."""
    from internvl import checkpoint, zoo
    from internvl.model.chat_config import InternVLChatConfig

    if Path(model).is_dir():
        return InternVLChatConfig.from_dict(checkpoint.read_config(model))
    return InternVLChatConfig.from_dict(zoo.official_config(model))  # unknown: ValueError with close names


def run_inspect(args: argparse.Namespace) -> int:
    """`inspect MODEL`: parts, parameters, LoRA targets, trainable count and a memory estimate."""
    from internvl.model_summary import format_summary, summarize

    summary = summarize(_load_config(args.model), llm_lora=args.llm_lora, backbone_lora=args.backbone_lora)
    print(format_summary(args.model, summary))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    """`merge INPUT OUTPUT`: fold every LoRA adapter into the weights and save in the official format."""
    from internvl import checkpoint
    from internvl.model.internvl_chat import InternVLChatModel

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = InternVLChatModel.from_pretrained(args.input, torch_dtype=dtype or "auto")
    ranks = (model.config.use_backbone_lora, model.config.use_llm_lora)
    model.merge_lora()
    model.save_pretrained(args.output)
    copied = checkpoint.copy_companion_files(args.input, args.output)
    print(f"merged LoRA (backbone r={ranks[0]}, llm r={ranks[1]}) into {args.output}")
    if copied:
        print(f"copied along: {', '.join(copied)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from internvl.data import validate

    parser = argparse.ArgumentParser(
        prog="internvl-lora", description="Fine-tune InternVL chat models with LoRA, merge and inspect them."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="architecture, parameters, LoRA targets and memory of a model (no weights read)"
    )
    inspect.add_argument("model", help="checkpoint folder, or an official name such as InternVL2_5-8B")
    inspect.add_argument("--llm-lora", type=int, default=0, metavar="R", help="LoRA rank on the LLM")
    inspect.add_argument("--backbone-lora", type=int, default=0, metavar="R", help="LoRA rank on the ViT")
    inspect.set_defaults(func=run_inspect)

    merge = commands.add_parser("merge", help="merge LoRA weights into the model, official format out")
    merge.add_argument("input", help="checkpoint folder with use_llm_lora / use_backbone_lora set")
    merge.add_argument("output", help="folder for the merged checkpoint")
    merge.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="dtype of the saved weights (auto: the input's)")
    merge.set_defaults(func=run_merge)

    validate.add_subcommand(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `internvl-lora`; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"internvl-lora {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
