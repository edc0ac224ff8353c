"""Shared fixtures: a tiny real tokenizer with every chat and image special token, and the demo's outputs."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from internvl.tiny import tiny_tokenizer


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

