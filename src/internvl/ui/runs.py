"""A run's training view, read from its output folder (or one of its `checkpoint-N`): what trained and how, its
checkpoints, its loss curve, and its final evaluation when `finetune --eval_meta_path` wrote one.

Only JSON files are read: the Trainer's `training_args.bin` is a pickle, which would run code to load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME

from internvl.evaluation.compare import EVAL_DIR
from internvl.evaluation.evaluate import OVERALL
from internvl.evaluation.report import REPORT
from internvl.train.outputs import read_manifest

LOSS_CURVE = "loss_curve.png"
# Settings the Trainer keeps in its state, as the page names them.
_STATE_FIELDS = {"global_step": "steps trained", "max_steps": "steps planned", "num_train_epochs": "epochs",
                 "train_batch_size": "batch size per device", "logging_steps": "logging steps"}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _lora_line(config: dict) -> str:
    targets = config.get("target_modules") or []
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    return f"r={config.get('r')}, alpha {config.get('lora_alpha')}, dropout {config.get('lora_dropout')} on {targets}"


def _checkpoints(folder: Path) -> list[dict]:
    found = []
    for path in folder.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append({"name": path.name, "step": int(match.group(1))})
    return sorted(found, key=lambda checkpoint: checkpoint["step"])


def training_view(folder: str | os.PathLike) -> dict:
    """The run in `folder` as the page shows it: `settings` ([label, value] rows), `checkpoints` ({name, step}),
    `has_loss_curve`, and `eval` (the final evaluation's overall results, or None)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    settings = [["base model", manifest.get("base_model")], ["template", manifest.get("template")]]
    for part, info in manifest["lora"].items():
        settings.append([f"{part} LoRA", _lora_line(_read_json(folder / info["adapter"] / "adapter_config.json"))])
    if manifest.get("trained_weights"):
        settings.append(["trained outside LoRA", f"{len(manifest['trained_weights'])} weights"])
    state = _read_json(folder / TRAINER_STATE_NAME)
    settings += [[label, state[key]] for key, label in _STATE_FIELDS.items() if state.get(key) is not None]
    logs = state.get("log_history", [])
    checkpoints = _checkpoints(folder)
    # The state keeps these intervals whether or not the run evaluated or saved: shown only where it did.
    if any("eval_loss" in entry for entry in logs):
        settings.append(["eval steps", state.get("eval_steps")])
    if checkpoints:
        settings.append(["save steps", state.get("save_steps")])
    rates = [entry["learning_rate"] for entry in logs if "learning_rate" in entry]
    if rates:
        settings.append(["peak learning rate", float(f"{max(rates):.4g}")])
    final = [entry["train_loss"] for entry in logs if "train_loss" in entry]
    if final:
        settings.append(["mean training loss", round(final[-1], 4)])
    report = _read_json(folder / EVAL_DIR / REPORT)
    evaluation = report["models"][0]["results"][OVERALL] if report.get("models") else None
    return {"folder": str(folder), "settings": settings, "checkpoints": checkpoints,
            "has_loss_curve": (folder / LOSS_CURVE).is_file(), "eval": evaluation}
