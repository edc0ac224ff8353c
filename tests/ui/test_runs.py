"""A run's training view, read from the folder of a fine-tune that evaluated and saved checkpoints."""

from __future__ import annotations

import json

from internvl.ui.runs import training_view


def test_the_training_view_shows_what_trained_its_checkpoints_and_its_final_eval(eval_run):
    out, _ = eval_run
    view = training_view(out)
    settings = dict(view["settings"])
    assert settings["base model"] == str(out.parent / "base")
    assert settings["language_model LoRA"].startswith("r=4, alpha 8, dropout 0.05 on mlp.down_proj")
    assert (settings["steps trained"], settings["eval steps"], settings["save steps"]) == (4, 2, 2)
    assert view["checkpoints"] == [{"name": "checkpoint-2", "step": 2}, {"name": "checkpoint-4", "step": 4}]
    assert view["has_loss_curve"]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert view["eval"] == report["models"][0]["results"]["overall"]


def test_a_checkpoint_is_a_run_of_its_own_steps_without_a_curve_or_eval(eval_run):
    out, _ = eval_run
    view = training_view(out / "checkpoint-2")
    assert dict(view["settings"])["steps trained"] == 2
    assert view["checkpoints"] == [] and not view["has_loss_curve"] and view["eval"] is None
