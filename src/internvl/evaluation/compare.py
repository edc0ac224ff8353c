"""The base and each adapter side by side on the same samples (what `internvl-lora eval` runs), and the model a
fine-tune has just trained (what `finetune --eval_meta_path` runs at its end).

The models are evaluated one after the other: the base, then each adapter put onto a fresh load of the base, each
freed before the next loads. Memory holds one model whatever the number of adapters, at the price of reading the
base's weights once per adapter (PEFT's adapter switching would read them once, but cannot switch the weights an
adapter folder holds outside LoRA, such as a trained projector).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

from internvl.evaluation.evaluate import evaluate_model
from internvl.evaluation.settings import EvalSettings
from internvl.evaluation.report import Evaluated, format_table, write_report
from internvl.inference import load_for_inference


def compare(base: str | os.PathLike, adapters: list[str], settings: EvalSettings, output_dir: str | os.PathLike,
            force_base_model: bool = False) -> tuple[list[Evaluated], dict[str, Path]]:
    """Evaluate the base and each adapter folder on it; write the report into `output_dir` (see `report`)."""
    names = ["base", *map(str, adapters)]
    if len(set(names)) != len(names):
        raise ValueError(f"each model must come once; got {', '.join(names)}")
    evaluated = []
    for adapter in [None, *adapters]:
        loaded = load_for_inference(base, adapter, force_base_model)
        results = evaluate_model(loaded.model, loaded.tokenizer, settings, loaded.name)
        evaluated.append(Evaluated(loaded.name, loaded.adapter, results))
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return evaluated, write_report(output_dir, settings, str(base), evaluated)


EVAL_DIR = "eval"  # the folder of a fine-tune's output folder that its final evaluation is written to


def evaluate_trained(model, tokenizer, settings: EvalSettings, run_dir: str | os.PathLike, base: str | None) -> Path:
    """Evaluate the model in memory that a fine-tune into `run_dir` trained, write the report into `run_dir/eval`
    and print its table; returns that folder."""
    folder = Path(run_dir) / EVAL_DIR
    evaluated = [Evaluated(str(run_dir), str(run_dir), evaluate_model(model, tokenizer, settings, str(run_dir)))]
    write_report(folder, settings, str(base), evaluated)
    print(format_table(evaluated))
    return folder
