"""The embedded default: `internvl-lora demo` trains something real on the CPU and reports it."""

from __future__ import annotations

import json


def test_demo_learns_the_new_skill_and_the_merged_model_agrees(demo_run):
    out = demo_run.out
    report = json.loads((out / "report.json").read_text())
    assert report["base_pretrain_accuracy"] >= 0.8  # the base knows English colours
    assert report["accuracy_before"] <= 0.1  # ... but not French ones
    assert report["accuracy_after"] >= 0.8  # LoRA taught it, measured on held-out images
    assert report["merged_matches_adapter"] and report["accuracy_merged"] == report["accuracy_after"]
    assert report["loss_last"] < report["loss_first"]
    assert 0 < report["trainable_params"] < report["total_params"]
    assert (out / "adapter" / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "loss_curve.png").is_file()
    assert "held-out French colour questions: 0% ->" in demo_run.stdout


def test_demo_ends_with_the_eval_and_ui_commands_for_its_outputs(demo_run):
    out = demo_run.out
    last = demo_run.stdout.strip().splitlines()[-2:]
    assert [line.strip() for line in last] == [
        f"internvl-lora eval {out / 'base'} --adapter {out / 'adapter'} --meta_path {out / 'data' / 'held_out.json'}",
        f"internvl-lora ui {out / 'base'} --adapter {out / 'adapter'}",
    ]
    assert (out / "data" / "held_out.json").is_file()
