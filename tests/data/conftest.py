"""Fixtures of the data tests: the checkpoint folder of tests/data/builders.py and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from internvl.data.tokenizer import load_tokenizer
from tests.data.builders import write_checkpoint


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def chat_tokenizer(model_dir):
    """The checkpoint's tokenizer with the InternVL special tokens, as training loads it."""
    return load_tokenizer(model_dir)
