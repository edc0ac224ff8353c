"""Shared fixtures: a tiny real tokenizer with every chat and image special token."""

from __future__ import annotations

import pytest

from internvl.tiny import tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
