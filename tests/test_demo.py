"""The embedded default: `internvl-lora demo` trains something real on the CPU and reports it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_learns_the_new_skill_and_the_merged_model_agrees(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "internvl.cli", "demo", "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["base_pretrain_accuracy"] >= 0.8  # the base knows English colours
    assert report["accuracy_before"] <= 0.1  # ... but not French ones
    assert report["accuracy_after"] >= 0.8  # LoRA taught it, measured on held-out images
    assert report["merged_matches_adapter"] and report["accuracy_merged"] == report["accuracy_after"]
    assert report["loss_last"] < report["loss_first"]
    assert 0 < report["trainable_params"] < report["total_params"]
    assert (out / "adapter" / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "loss_curve.png").is_file()
    assert "held-out French colour questions: 0% ->" in result.stdout
