"""The `internvl-lora` command line: a thin layer over functions importable from Python."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

import torch

DEMO_OUTPUT_DIR = "demo-output"  # where `demo` (and `finetune` with no arguments) writes
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


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
    """`merge INPUT OUTPUT`: fold the LoRA of INPUT (or of --adapter, put onto the base INPUT) into the weights and
    save the official format into a new OUTPUT (or, with --overwrite, over a model merged before)."""
    from internvl import checkpoint
    from internvl.model.internvl_chat import InternVLChatModel
    from internvl.train.outputs import check_merge_output, load_adapter, read_manifest, save_merged_model

    check_merge_output(args.output, args.overwrite, inputs=(args.input, args.adapter))
    if args.adapter:
        read_manifest(args.adapter)  # a wrong --adapter is named before the model loads
    else:
        config = checkpoint.read_config(args.input)
        if not (config.get("use_llm_lora") or config.get("use_backbone_lora")):
            raise ValueError(f"{args.input}: nothing to merge: its config.json sets no use_llm_lora or "
                             "use_backbone_lora rank, and no --adapter was given")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = InternVLChatModel.from_pretrained(args.input, torch_dtype=dtype or "auto")
    if args.adapter:
        load_adapter(model, args.adapter, force=args.force_base_model)
    source = args.adapter or args.input
    model.checkpoint_format = args.to or model.checkpoint_format
    if model.checkpoint_format == "hf" and model.img_context_token_id is None:
        from internvl.convert import image_token_id

        model.img_context_token_id = image_token_id(source, model.config.llm_config.vocab_size)
    record, copied = save_merged_model(model, args.output, source, args.input, overwrite=args.overwrite)
    lora = ", ".join(f"{part} r={rank}" for part, rank in record["lora"].items()) or "no LoRA, only trained weights"
    print(f"merged {source} into {args.output}: {lora}")
    if copied:
        print(f"copied along: {', '.join(copied)}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """`convert INPUT OUTPUT --to hf|original`: a checkpoint, or a fine-tune's adapters, in the other format."""
    from internvl.convert import convert

    what = convert(args.input, args.output, args.to, base=args.base, force=args.force_base_model)
    print(f"converted the {what} of {args.input} to the {args.to} format in {args.output}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """`export RUN OUT --for vllm|lmdeploy`: the run's adapters as one LoRA folder that engine applies to the base."""
    from internvl.export import export_adapter

    print(export_adapter(args.run, args.output, args.engine, base=args.base, force=args.force_base_model), end="")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    """`finetune ...`: the official trainer's arguments (and any HF TrainingArguments); none: the demo."""
    if not args.rest:
        return run_demo(argparse.Namespace(output_dir=DEMO_OUTPUT_DIR))
    from internvl.train.args import parse_finetune_args
    from internvl.train.finetune import finetune, interrupted_message

    model_args, data_args, training_args = parse_finetune_args(args.rest)
    # A scheduler's or torchrun's SIGTERM stops the run as Ctrl-C does: one line, checkpoints intact.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = finetune(model_args, data_args, training_args)
    except KeyboardInterrupt:
        print(f"internvl-lora finetune: {interrupted_message(training_args.output_dir)}", file=sys.stderr)
        return INTERRUPTED
    finally:
        if torch.distributed.is_initialized():
            # Left to interpreter exit, gloo's threads can abort a rank ("terminate called without an active
            # exception"), a refused run's too.
            torch.distributed.destroy_process_group()
    print(f"adapters, tokenizer and manifest in {result.output_dir}")
    return 0


def _open_image(path: str):
    """The --image file decoded as RGB; a ValueError naming it when it is a folder, missing or no image."""
    from internvl.data.reading import open_image

    if Path(path).is_dir():
        raise ValueError(f"--image {path}: a folder, not an image file")
    return open_image(path)


def run_chat(args: argparse.Namespace) -> int:
    """`chat MODEL [--adapter DIR] [--image PATH | --video PATH] [QUESTION]`: one answer, or a session without
    QUESTION; images tiled and prompts built with the settings the adapter (or the model) was trained with."""
    from internvl.data.video import load_video, video_prefix
    from internvl.inference import load_for_inference
    from internvl.train.outputs import ServingSettings

    if args.image and args.video:
        raise ValueError("--image and --video: ask about one of them")
    image = _open_image(args.image) if args.image else None
    loaded = load_for_inference(args.model, args.adapter, args.force_base_model)
    model, tokenizer = loaded.model, loaded.tokenizer
    pixel_values = None if image is None else ServingSettings.from_model(model).image_tiles(image)
    # A video is its frames, as the model cards ask: one tile each, each named in a prefix to the first question.
    frames, prefix = None, ""
    if args.video:
        pixel_values, frames = load_video(args.video, args.num_segments, input_size=model.config.image_size)
        prefix = video_prefix(len(frames))
    config = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if args.question:
        print(model.chat(tokenizer, pixel_values, prefix + args.question, config, num_patches_list=frames))
        return 0
    history = None
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            return 0
        if question in ("", "exit", "quit"):
            return 0
        answer, history = model.chat(tokenizer, pixel_values, prefix + question, config, history=history,
                                     return_history=True, num_patches_list=frames)
        pixel_values, frames, prefix = None, None, ""  # the first question carries the image or video
        print(f"model> {answer}")


def run_eval(args: argparse.Namespace) -> int:
    """`eval MODEL --meta_path META [--adapter RUN ...]`: the base and each adapter side by side, files written."""
    from internvl.evaluation.compare import compare
    from internvl.evaluation.report import format_table
    from internvl.evaluation.settings import EvalSettings

    settings = EvalSettings(args.meta_path, args.max_samples, args.seed, args.batch_size, args.max_new_tokens,
                            args.max_seq_length)
    evaluated, paths = compare(args.model, args.adapter, settings, args.output_dir, args.force_base_model)
    print(format_table(evaluated))
    print(f"per-sample answers: {paths['answers']}; report: {paths['report']}; chart: {paths['chart']}")
    return 0


def run_ui(args: argparse.Namespace) -> int:
    """`ui MODEL [--adapter RUN ...]`: the local web page comparing the base and each adapter."""
    from internvl.ui.server import serve

    serve(args.model, args.adapter, args.host, args.port, args.force_base_model)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`demo`: the whole pipeline on a tiny model built in code, on the CPU, in a few minutes."""
    from internvl.demo import format_report, run_demo as demo

    print(format_report(demo(args.output_dir)))
    return 0


def user_message(error: Exception) -> str:
    """The one line a user error says. torch re-raises a DataLoader worker's error with the worker's traceback in
    its message; its last line is "Type: message", the error itself."""
    message = str(error)
    if message.startswith("Caught ") and "DataLoader worker" in message.partition("\n")[0]:
        message = message.rstrip().rpartition("\n")[2].partition(": ")[2]
    return message


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from internvl.data import validate
    from internvl.evaluation.settings import EvalSettings
    from internvl.ui import DEFAULT_HOST, DEFAULT_PORT

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
    merge.add_argument("input", help="checkpoint folder: with use_*_lora set, or a base model with --adapter")
    merge.add_argument("output", help="folder for the merged checkpoint")
    merge.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="dtype of the saved weights (auto: the input's)")
    merge.add_argument("--adapter", help="adapter folder written by finetune, merged into the base INPUT")
    merge.add_argument("--force-base-model", "--force_base_model", action="store_true",
                       help="merge an adapter trained on another base, or onto a model with LoRA merged in")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace OUTPUT if it holds a model merged before (never any other folder)")
    merge.add_argument("--to", choices=["original", "hf"],
                       help="format of the merged model (default: the base's; hf: transformers' InternVL)")
    merge.set_defaults(func=run_merge)

    convert = commands.add_parser(
        "convert", help="a checkpoint or a fine-tune's adapters: official format <-> transformers' InternVL (-hf)"
    )
    convert.add_argument("input", help="checkpoint folder (either format), or an output folder written by finetune")
    convert.add_argument("output", help="new or empty folder for the converted copy")
    convert.add_argument("--to", required=True, choices=["hf", "original"], help="the format to write")
    convert.add_argument("--base", help="adapters only: their base model (default: the one their manifest names)")
    convert.add_argument("--force-base-model", "--force_base_model", action="store_true",
                         help="adapters only: convert against a base other than the one they were trained on")
    convert.set_defaults(func=run_convert)

    export = commands.add_parser(
        "export", help="a fine-tune's adapters as one LoRA adapter folder for vLLM or lmdeploy"
    )
    export.add_argument("run", help="output folder (or checkpoint-N) written by finetune")
    export.add_argument("output", help="new or empty folder for the exported adapter")
    export.add_argument("--for", dest="engine", required=True, choices=["vllm", "lmdeploy"],
                        help="the serving engine")
    export.add_argument("--base", help="the official base model served (default: the one the manifest names)")
    export.add_argument("--force-base-model", "--force_base_model", action="store_true",
                        help="export against a base other than the one the adapters were trained on")
    export.set_defaults(func=run_export)

    finetune = commands.add_parser(
        "finetune", add_help=False,
        help="LoRA fine-tune with the official trainer's arguments (no arguments: the demo)",
    )
    finetune.set_defaults(func=run_finetune)

    chat = commands.add_parser("chat", help="ask a model (optionally with an adapter and an image)")
    chat.add_argument("model", help="checkpoint folder (official format)")
    chat.add_argument("question", nargs="?", help="one question; without it, an interactive session")
    chat.add_argument("--adapter", help="adapter folder written by finetune")
    chat.add_argument("--image", help="image file")
    chat.add_argument("--video", help="video file (MP4, WebM, GIF, ...) or folder of frame images")
    chat.add_argument("--num-segments", "--num_segments", type=int, default=8, metavar="N",
                      help="frames taken from the video, the middle of each of N equal segments (default 8)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--force-base-model", "--force_base_model", action="store_true",
                      help="load an adapter trained on another base, or onto a model with LoRA merged in")
    chat.set_defaults(func=run_chat)

    evaluate = commands.add_parser(
        "eval", help="loss and generation metrics of the base and each adapter on held-out data, side by side"
    )
    evaluate.add_argument("model", help="base checkpoint folder (official format)")
    evaluate.add_argument("--meta_path", required=True, metavar="META",
                          help="meta JSON naming held-out JSONL datasets in the training format")
    evaluate.add_argument("--adapter", action="append", default=[], metavar="RUN",
                          help="adapter folder written by finetune (repeat for several)")
    evaluate.add_argument("--output_dir", default="runs/eval", help="where report.json, answers.jsonl and the chart go")
    evaluate.add_argument("--max_samples", type=int, metavar="N", help="at most N samples per dataset, seeded choice")
    evaluate.add_argument("--seed", type=int, default=EvalSettings.seed)
    evaluate.add_argument("--batch_size", type=int, default=EvalSettings.batch_size, help="samples per batch")
    evaluate.add_argument("--max_new_tokens", type=int, default=EvalSettings.max_new_tokens)
    evaluate.add_argument("--max_seq_length", type=int, default=EvalSettings.max_seq_length,
                          help="longest sample in tokens, images included")
    evaluate.add_argument("--force-base-model", action="store_true", help="load adapters trained on another base")
    evaluate.set_defaults(func=run_eval)

    ui = commands.add_parser("ui", help="a local web page: ask the base and each adapter side by side, see the runs")
    ui.add_argument("model", help="base checkpoint folder (official format)")
    ui.add_argument("--adapter", action="append", default=[], metavar="RUN",
                    help="adapter folder written by finetune (repeat for several); each holds a copy of the base")
    ui.add_argument("--host", default=DEFAULT_HOST,
                    help="address to listen on (default: this machine only; anyone who reaches it runs the models)")
    ui.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free one; the address is printed)")
    ui.add_argument("--force-base-model", action="store_true", help="load adapters trained on another base")
    ui.set_defaults(func=run_ui)

    demo = commands.add_parser("demo", help="the whole pipeline on a tiny built-in model, on the CPU")
    demo.add_argument("--output-dir", default=DEMO_OUTPUT_DIR)
    demo.set_defaults(func=run_demo)

    validate.add_subcommand(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `internvl-lora`; user errors print one line and exit with status 2."""
    # Deprecation notices transformers raises from inside PEFT mean nothing to a user of this command.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    parser = build_parser()
    # finetune hands every option on to HfArgumentParser, which knows the official and the HF names.
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = parser.parse_known_args(argv)
    if args.command == "finetune":
        args.rest = argv[argv.index("finetune") + 1:]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"internvl-lora {args.command}: error: {user_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was being written is in a staging folder, removed on the way out
        print(f"internvl-lora {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
