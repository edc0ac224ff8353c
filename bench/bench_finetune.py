"""The `finetune` loop end to end on the official InternVL LoRA recipe: HF + PEFT against the fused path.

One command on a CUDA machine, nothing downloaded: the model is built at the full shape (`--model`, an official
name from the zoo) with random bf16 weights, and trained by `internvl.train.finetune.finetune` itself on a
synthetic dataset shaped like real SFT data, written by the bench (seeded): images of 12 aspect ratios from 336 to
1344 px (1 to 7 tiles with the thumbnail), 15% text-only samples, 1 to 3 turns, answers log-normal around 75 words
with a tail to 1,200. The official recipe: batch 4 per GPU, dynamic tiles (6 + thumbnail), max_seq_length 8192,
LoRA 16 on the LLM, everything else frozen, gradient checkpointing, length-grouped batches, 4 loader workers, and
the engine of `--deepspeed` (default the official zero_stage1_config.json, the package's copy).

    python bench/bench_finetune.py                # every row, each in a process of its own under torchrun
    python bench/bench_finetune.py --rows fused   # one row
    python bench/bench_finetune.py --gpus 1 2 4 8 # every row on 1, 2, 4 and 8 GPUs of this host: weak scaling

Rows: `peft` (--fast_lora False: PEFT's layers, padded and length-grouped as the official trainer runs it; like
every row, under `finetune`'s cap of ZeRO-1/2 reduce buckets at the trainable weights, which the official trainer
lacks: it holds 3.6 GiB more on each GPU under the official configs),
`fused` (the default fast path, padded) and `packed` (the fast path on packs: --use_packed_ds, one pack of
`--packed_tokens` tokens and at most `--packed_images` tiles per step, the official packing options otherwise).
The fused rows fit their checkpoint plan to the first row's measured peak (`--memory_budget_gib`), so that none
uses more memory than HF + PEFT. Each row runs in a fresh process (so peaks do not mix); over the `--steps` steps
after `--warmup` (loader included): the median step, samples/s and real (non-pad) tokens/s over the whole span,
the padding share, the peak GiB (from the second step on: the fused rows fit their plan after the first), and
the ratio of real tokens/s to the first row's. On several GPUs (`--gpus`), each rank runs the per-GPU recipe
(weak scaling); counts are summed over the ranks, the peak is the largest rank's, and the table adds real tokens/s
per GPU and its share of the same row's per-GPU rate on the fewest GPUs run (scaling efficiency). Every run of
several ranks that keep whole weights (DDP, ZeRO-1/2) checks that they end with identical adapters, and fails
otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
ROWS = ("peft", "fused", "packed")
ASPECTS = [(336, 336), (448, 448), (672, 448), (448, 672), (896, 448), (448, 896), (896, 672), (672, 896),
           (1344, 448), (448, 1344), (1344, 896), (896, 1344)]
WORDS = ("the a shape colour image shows left right above below red blue green large small circle square next "
         "to beside one two three object background photo picture scene person table window light dark").split()


def write_sft_data(root: Path, samples: int, seed: int) -> Path:
    """A seeded synthetic SFT set shaped like real data (see the module docstring); returns the meta file."""
    from PIL import Image

    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(ASPECTS):
        Image.new("RGB", (width, height), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(
            images / f"{i}.png")
    lines = []
    for _ in range(samples):
        turns = []
        for turn in range(rng.choice((1, 1, 2, 3))):
            words = min(1200, max(1, int(rng.lognormvariate(math.log(75), 0.8))))
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 25))) + "?"
            turns += [{"from": "human", "value": question},
                      {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=words)) + "."}]
        record = {"conversations": turns}
        if rng.random() >= 0.15:
            record["image"] = f"{rng.randrange(len(ASPECTS))}.png"
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        lines.append(json.dumps(record))
    (root / "sft.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"sft": {"root": str(images), "annotation": str(root / "sft.jsonl"), "data_augment": False,
                    "repeat_time": 1, "length": samples}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def run_row(row: str, args: argparse.Namespace) -> dict:
    """Train one row in this process; its median step, throughput and peak memory."""
    import torch
    from transformers import TrainerCallback

    from internvl.model.chat_config import InternVLChatConfig
    from internvl.model.internvl_chat import InternVLChatModel
    from internvl.tiny import tiny_tokenizer
    from internvl.train.args import parse_finetune_args
    from internvl.train.finetune import finetune
    from internvl.zoo import official_config

    class StepTimer(TrainerCallback):
        """Wall time, real (attended) and padded tokens of every optimizer step, the loader's time included."""

        def __init__(self):
            self.ends, self.real, self.padded, self.samples = [], [0], [0], [0]

        def count(self, module, args, kwargs):
            """A forward pre-hook on the chat model: the batch's tokens (every forward is one micro-batch); a
            packed batch has no padding, hence no mask."""
            mask = kwargs.get("attention_mask")
            self.real[-1] += kwargs["input_ids"].numel() if mask is None else int(mask.sum())
            self.padded[-1] += kwargs["input_ids"].numel()
            cu_seqlens = kwargs.get("cu_seqlens")
            self.samples[-1] += len(kwargs["input_ids"]) if cu_seqlens is None else len(cu_seqlens) - 1

        def on_step_begin(self, args, state, control, **kwargs):
            if len(self.ends) == 1 and not self.real[-1]:  # the second step: the plan's fit is behind us
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.real.append(0)
            self.padded.append(0)
            self.samples.append(0)

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    meta = write_sft_data(work / "data", args.samples, seed=0)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # torchrun's rank on this host: its own GPU
    torch.manual_seed(0)
    config = InternVLChatConfig.from_dict(official_config(args.model))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = InternVLChatModel(config)
    torch.set_default_dtype(torch.float32)
    recipe = [
        "--meta_path", str(meta), "--output_dir", str(work / "run"), "--conv_style", config.template or "internvl2_5",
        "--force_image_size", "448", "--max_dynamic_patch", "6", "--down_sample_ratio", "0.5",
        "--dynamic_image_size", "True", "--use_thumbnail", "True", "--ps_version", "v2", "--vision_select_layer", "-1",
        "--freeze_llm", "True", "--freeze_mlp", "True", "--freeze_backbone", "True", "--use_llm_lora", "16",
        "--grad_checkpoint", "True", "--bf16", "True",
        "--gradient_accumulation_steps", "1", "--learning_rate", "4e-5", "--weight_decay", "0.05",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--max_seq_length", "8192",
        "--group_by_length", "True", "--dataloader_num_workers", "4", "--max_steps", str(args.warmup + args.steps),
        "--save_strategy", "no", "--logging_steps", "1000", "--report_to", "none", "--disable_tqdm", "True",
        "--fast_lora", str(row != "peft"),
    ]
    if row == "packed":
        recipe += ["--per_device_train_batch_size", "1", "--use_packed_ds", "True", "--max_packed_tokens",
                   str(args.packed_tokens), "--num_images_expected", str(args.packed_images), "--strict_mode", "False",
                   "--replacement", "True", "--max_buffer_size", "20"]
    else:
        recipe += ["--per_device_train_batch_size", str(args.batch)]
    if args.memory_budget_gib and row != "peft":
        recipe += ["--memory_budget_gib", str(args.memory_budget_gib)]
    if args.deepspeed != "none":
        recipe += ["--deepspeed", args.deepspeed]
    timer = StepTimer()
    model.register_forward_pre_hook(timer.count, with_kwargs=True)
    torch.cuda.reset_peak_memory_stats()
    finetune(*parse_finetune_args(recipe), model=model, tokenizer=tiny_tokenizer(), callbacks=[timer])
    steps = range(args.warmup, len(timer.ends))  # step i ran from ends[i - 1] to ends[i]
    durations = [timer.ends[i] - timer.ends[i - 1] for i in steps]
    step = statistics.median(durations)
    # Summed over the ranks (each read its own batches), the peak of the fullest rank.
    counts = torch.tensor([sum(timer.real[i] for i in steps), sum(timer.padded[i] for i in steps),
                           sum(timer.samples[i] for i in steps)], dtype=torch.float64, device="cuda")
    peak = torch.tensor([torch.cuda.max_memory_allocated()], dtype=torch.float64, device="cuda")
    world = 1
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    real, padded, samples = counts.tolist()
    # Rates over the whole timed span: length-grouped steps differ in length, so a median step is no average one.
    return {"row": row, "gpus": world, "s_per_step": step, "samples_per_s": samples / sum(durations),
            "real_tokens_per_s": real / sum(durations), "padding": 1 - real / padded,
            "peak_gib": peak.item() / GiB}


def main() -> None:
    """Run each row in its own process (or, with --row, one row here) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="InternVL2_5-8B")
    parser.add_argument("--rows", nargs="+", default=["peft", "fused", "packed"], choices=ROWS)
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--packed_tokens", type=int, default=16384)
    parser.add_argument("--packed_images", type=int, default=64)
    parser.add_argument("--memory_budget_gib", type=float, help="the fused rows' budget (default: the peft row's "
                        "measured peak when it runs first, else HF + PEFT's all-checkpointed peak, measured)")
    parser.add_argument("--deepspeed", default="zero_stage1_config.json", help="config file or name; 'none': DDP")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts of this host to run each row on")
    args = parser.parse_args()
    if args.row is not None:
        result = run_row(args.row, args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for gpus in args.gpus:
        first = None
        for row in args.rows:
            budget = []
            if first is not None and first["row"] == "peft" and args.memory_budget_gib is None:
                budget = ["--memory_budget_gib", f"{first['peak_gib']:.3f}"]
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), __file__,
                       "--row", row, *sys.argv[1:], *budget]  # a --row run ignores --gpus
            output = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if output.returncode or not lines:
                print(f"row {row} on {gpus} GPU(s) failed:\n{output.stdout[-3000:]}\n{output.stderr[-3000:]}",
                      flush=True)
                continue
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
            first = first or results[-1]
            print(f"{row}, {gpus} GPU(s): {results[-1]}", flush=True)
    if results:
        print_table(results, args)


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    """The results as a Markdown table: ratios to the first row run on as many GPUs, and per-GPU rates to the
    same row's on the fewest GPUs run."""
    import torch
    import transformers

    print(f"\n{args.model}, --deepspeed {args.deepspeed}, batch {args.batch} per GPU (packed: 1 pack of "
          f"{args.packed_tokens} tokens, {args.packed_images} tiles), {args.steps} steps after {args.warmup}; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print("| GPUs | row | s/step (median) | samples/s | real tokens/s | per GPU | scaling | padding | peak GiB/GPU "
          "| x first row |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        first = next(r for r in results if r["gpus"] == result["gpus"])
        fewest = min((r for r in results if r["row"] == result["row"]), key=lambda r: r["gpus"])
        per_gpu = result["real_tokens_per_s"] / result["gpus"]
        print(f"| {result['gpus']} | {result['row']} | {result['s_per_step']:.3f} | {result['samples_per_s']:.2f} | "
              f"{result['real_tokens_per_s']:,.0f} | {per_gpu:,.0f} | "
              f"{per_gpu / (fewest['real_tokens_per_s'] / fewest['gpus']):.0%} | {result['padding']:.0%} | "
              f"{result['peak_gib']:.2f} | {result['real_tokens_per_s'] / first['real_tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
