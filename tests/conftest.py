"""Shared fixtures: a tiny real tokenizer with every chat and image special token, the demo's outputs, and a
fine-tune that evaluates as it trains."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from internvl.synthetic import write_dataset, write_meta
from internvl.tiny import tiny_tokenizer
from tests.builders import build_model


def _cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "internvl.cli", *args], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@dataclass(frozen=True)
class DemoRun:
    """`internvl-lora demo` run once: its output folder and what it printed."""

    out: Path
    stdout: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The demo, run as a subprocess: a base that answers in English and an adapter that answers in French, with
    their held-out French set; the demo's own test checks them, the eval and ui tests use them."""
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    return DemoRun(out, _cli("demo", "--output-dir", str(out)).stdout)


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`finetune` on a tiny model, evaluating its held-out set every 2 steps (in one batch) and at its end, with a
    checkpoint every 2 steps: the run folder and the finished process."""
    root = tmp_path_factory.mktemp("eval_run")
    base = root / "base"
    build_model("Qwen2ForCausalLM", template="internvl2_5").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    write_meta(root / "train.json", {"french": write_dataset(root, "french", ("french",), 16, 56, seed=1)})
    write_meta(root / "held_out.json", {"held_out": write_dataset(root, "held_out", ("french",), 8, 56, seed=2)})
    out = root / "run"
    result = _cli(
        "finetune", "--model_name_or_path", str(base), "--meta_path", str(root / "train.json"), "--eval_meta_path",
        str(root / "held_out.json"), "--conv_style", "internvl2_5", "--force_image_size", "56", "--max_dynamic_patch",
        "1", "--freeze_llm", "True", "--freeze_backbone", "True", "--freeze_mlp", "True", "--use_llm_lora", "4",
        "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2", "--logging_steps",
        "1", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--learning_rate", "2e-2",
        "--use_cpu", "True", "--output_dir", str(out),
    )
    return out, result
