"""`internvl-lora eval` and `finetune --eval_meta_path` as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl.cli", *args], capture_output=True, text=True, timeout=600)


def test_eval_of_the_demo_s_outputs_gives_the_demo_s_figures_side_by_side(demo_run):
    printed = demo_run.stdout.strip().splitlines()[-2].split()  # the eval command the demo ends with
    assert printed[:2] == ["internvl-lora", "eval"]
    out = demo_run.out / "eval"
    result = cli(*printed[1:], "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    demo = json.loads((demo_run.out / "report.json").read_text())
    report = json.loads((out / "report.json").read_text())
    base, adapter = ({**model["results"]["held_out"], "name": model["name"]} for model in report["models"])
    assert base["name"] == "base" and adapter["name"] == str(demo_run.out / "adapter")
    # The demo asks through `chat`, eval through the training samples' prompts: the same answers.
    assert base["exact_match"] == pytest.approx(100 * demo["accuracy_before"])
    assert adapter["exact_match"] == pytest.approx(100 * demo["accuracy_after"])
    assert base["samples"] == adapter["samples"] == 60
    assert adapter["bleu"] > 80 > 10 > base["bleu"] and adapter["rouge_l"] > 80 > 10 > base["rouge_l"]
    assert adapter["loss"] < base["loss"] and adapter["perplexity"] < base["perplexity"]
    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 60
    right = [line for line in lines if line[adapter["name"]]["exact_match"] == 100]
    assert len(right) == round(0.6 * adapter["exact_match"])
    assert all(line[adapter["name"]]["answer"] == line["reference"] for line in right)
    assert lines[0]["question"] == "Quelle est la couleur de la forme?"
    table = result.stdout.splitlines()
    assert table[0].split() == ["dataset", "model", "samples", "loss", "perplexity", "exact", "match", "BLEU", "chrF",
                                "ROUGE-L"]
    assert table[2].split()[:3] == ["held_out", adapter["name"], "60"]
    assert Image.open(out / "report.png").size == (900, 400)


def test_finetune_logs_the_eval_loss_to_tensorboard_and_draws_it_on_the_loss_curve(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = eval_run
    (run,) = {path.parent for path in out.glob("runs/*/events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    assert [event.step for event in events.Scalars("eval/loss")] == [2, 4]
    curve = np.asarray(Image.open(out / "loss_curve.png").convert("RGB"))
    orange = (255, 127, 14)  # matplotlib's tab:orange, the eval series' colour (nothing else in the plot has it)
    assert (curve == orange).all(axis=-1).sum() > 50


def test_finetune_ends_with_the_trained_model_s_eval_report(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result = eval_run
    report = json.loads((out / "eval" / "report.json").read_text())
    (model,) = report["models"]
    assert model["name"] == str(out)
    (run,) = {path.parent for path in out.glob("runs/*/events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    # Eight samples in one eval batch: the Trainer's eval loss at the last step is the token mean eval reports.
    assert model["results"]["held_out"]["loss"] == pytest.approx(events.Scalars("eval/loss")[-1].value, rel=1e-4)
    assert len((out / "eval" / "answers.jsonl").read_text().splitlines()) == 8
    assert f"eval report, per-sample answers and chart in {out / 'eval'}" in result.stdout
