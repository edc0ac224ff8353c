"""The embedded default: the whole pipeline on a tiny InternVL, on a laptop CPU, in a few minutes.

1. Build a tiny InternVL (seeded), a tokenizer and a synthetic dataset of coloured shapes (`internvl.synthetic`).
2. Give the base model knowledge first, as real bases have: train all of it on English colour and shape
   questions, and save it as an official-format checkpoint.
3. Ask it every held-out French question ("Quelle est la couleur de la forme?"): it cannot answer in French.
4. LoRA-fine-tune only the LLM (everything else frozen) on French answers, through `internvl-lora finetune`'s
   own code path, then ask again.
5. Merge the adapter, check the merged model gives the same answers, and write `report.json`.
The report ends with the `eval` and `ui` commands that compare the base and the adapter on the held-out set.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments

from internvl.data.tiling import load_image
from internvl.model.internvl_chat import InternVLChatModel
from internvl.synthetic import read_questions, write_dataset, write_meta
from internvl.tiny import tiny_config, tiny_tokenizer
from internvl.train.args import DataArguments, ModelArguments
from internvl.train.finetune import finetune
from internvl.train.outputs import load_adapter, save_merged_model

IMAGE_SIZE = 56
TEMPLATE = "internvl2_5"


@dataclass
class DemoReport:
    """What the demo measured (written to report.json)."""

    accuracy_before: float
    accuracy_after: float
    accuracy_merged: float
    merged_matches_adapter: bool
    loss_first: float
    loss_last: float
    trainable_params: int
    total_params: int
    trained_parts: list[str]
    base_pretrain_accuracy: float
    seconds: float
    files: dict[str, str]


def _ask_all(model: InternVLChatModel, tokenizer, items) -> list[str]:
    config = dict(max_new_tokens=4, do_sample=False)
    answers = []
    for image, question, _ in items:
        pixel_values = load_image(image, input_size=IMAGE_SIZE, max_num=1)
        answers.append(model.chat(tokenizer, pixel_values, question, config))
    return answers


def _accuracy(answers: list[str], items) -> float:
    return sum(a.strip().lower() == expected for a, (_, _, expected) in zip(answers, items)) / len(items)


def _training_args(output_dir: Path, steps: int, learning_rate: float, batch_size: int, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 30), weight_decay=0.0,
        logging_steps=10, save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=False,
    )


def run_demo(output_dir: str | Path, seed: int = 0, pretrain_steps: int = 400,
             lora_steps: int = 300, lora_rank: int = 8) -> DemoReport:
    """Run the whole demo into `output_dir` and return its report (also written to report.json)."""
    start = time.time()
    out = Path(output_dir)
    data = out / "data"
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    english = write_dataset(data, "english", ("colour", "shape"), 3000, IMAGE_SIZE, seed)
    french = write_dataset(data, "french", ("french",), 800, IMAGE_SIZE, seed + 1)
    held_out = write_dataset(data, "held_out", ("french",), 60, IMAGE_SIZE, seed + 2)
    held_out_meta = write_meta(data / "held_out.json", {"held_out": held_out})
    english_check = write_dataset(data, "held_out_english", ("colour",), 60, IMAGE_SIZE, seed + 3)
    common = dict(conv_style=TEMPLATE, force_image_size=IMAGE_SIZE, max_seq_length=512, max_dynamic_patch=1)

    print(f"[1/4] pre-training the tiny base model on English questions ({pretrain_steps} steps)")
    model = InternVLChatModel(tiny_config("Qwen2ForCausalLM", vocab_size=len(tokenizer), image_size=IMAGE_SIZE,
                                          template=TEMPLATE))
    finetune(
        ModelArguments(grad_checkpoint=False),
        DataArguments(meta_path=str(write_meta(data / "english.json", {"english": english})), **common),
        _training_args(out / "pretrain", pretrain_steps, 3e-3, 16, seed),
        model=model, tokenizer=tokenizer,
    )
    base = out / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    english_items = read_questions(english_check)
    base_accuracy = _accuracy(_ask_all(model.eval(), tokenizer, english_items), english_items)

    items = read_questions(held_out)
    print("[2/4] asking the base model the held-out French questions")
    before = _accuracy(_ask_all(model, tokenizer, items), items)

    print(f"[3/4] LoRA fine-tuning the LLM (r={lora_rank}, everything else frozen, {lora_steps} steps)")
    adapter = out / "adapter"
    result = finetune(
        ModelArguments(model_name_or_path=str(base), freeze_backbone=True, freeze_llm=True, freeze_mlp=True,
                       use_llm_lora=lora_rank, grad_checkpoint=False),
        DataArguments(meta_path=str(write_meta(data / "french.json", {"french": french})), **common),
        _training_args(adapter, lora_steps, 2e-3, 16, seed),
    )
    tuned = InternVLChatModel.from_pretrained(base).eval()
    load_adapter(tuned, adapter)
    answers = _ask_all(tuned, tokenizer, items)
    after = _accuracy(answers, items)

    print("[4/4] merging the adapter and asking the merged model")
    merged_dir = out / "merged"
    save_merged_model(tuned, merged_dir, adapter, base, overwrite=True)
    merged = InternVLChatModel.from_pretrained(merged_dir).eval()
    merged_answers = _ask_all(merged, tokenizer, items)

    report = DemoReport(
        accuracy_before=before,
        accuracy_after=after,
        accuracy_merged=_accuracy(merged_answers, items),
        merged_matches_adapter=merged_answers == answers,
        loss_first=result.losses[0][1],
        loss_last=result.losses[-1][1],
        trainable_params=result.trainable_params,
        total_params=result.total_params,
        trained_parts=["language_model LoRA"],
        base_pretrain_accuracy=base_accuracy,
        seconds=round(time.time() - start, 1),
        files={"base": str(base), "adapter": str(adapter), "merged": str(merged_dir),
               "loss_curve": str(adapter / "loss_curve.png"), "data": str(data), "held_out": str(held_out_meta)},
    )
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def format_report(report: DemoReport) -> str:
    """The short human-readable report printed at the end of the demo."""
    share = 100.0 * report.trainable_params / report.total_params
    lines = [
        "internvl-lora demo: report",
        f"  base model (pre-trained here): English colour questions {report.base_pretrain_accuracy:.0%} right",
        f"  trained: {', '.join(report.trained_parts)}; {report.trainable_params:,} of {report.total_params:,} "
        f"parameters ({share:.2f}%)",
        f"  loss: {report.loss_first:.3f} -> {report.loss_last:.3f}",
        f"  held-out French colour questions: {report.accuracy_before:.0%} -> {report.accuracy_after:.0%} right",
        f"  merged model: {report.accuracy_merged:.0%} right; same answers as base + adapter: "
        f"{'yes' if report.merged_matches_adapter else 'NO'}",
        f"  took {report.seconds:.0f} s",
        "  files:",
    ]
    lines += [f"    {name:<11}{path}" for name, path in report.files.items()]
    base, adapter = report.files["base"], report.files["adapter"]
    lines += [
        "  compare the base and the adapter: metrics on the held-out set, then side by side in a browser:",
        f"    internvl-lora eval {base} --adapter {adapter} --meta_path {report.files['held_out']}",
        f"    internvl-lora ui {base} --adapter {adapter}",
    ]
    return "\n".join(lines)
