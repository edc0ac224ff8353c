"""The official InternVL model family's `config.json` files, shipped so that models can be built with no network.

The data lives in `zoo_configs/<name>.json`, one official-format config per model, named as the OpenGVLab repos
spell it. Keys starting with `_` (such as `_source`, the provenance of each file) are ours and are dropped on
load.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from importlib import resources

_CONFIGS = resources.files("internvl") / "zoo_configs"


@cache
def _files() -> dict[str, str]:
    """Lower-cased model name -> file name, so lookups ignore case."""
    return {entry.name.removesuffix(".json").lower(): entry.name for entry in _CONFIGS.iterdir()
            if entry.name.endswith(".json")}


def official_names() -> list[str]:
    """Names of every official model with a shipped config, sorted."""
    return sorted(name.removesuffix(".json") for name in _files().values())


def official_config(name: str) -> dict:
    """The official `config.json` of model `name` (any case), without our `_` keys.

    An unknown name raises ValueError naming the closest official ones.
    """
    files = _files()
    if name.lower() not in files:
        close = [files[match].removesuffix(".json")
                 for match in difflib.get_close_matches(name.lower(), files, n=5, cutoff=0.6)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"Unknown official InternVL model {name!r}; {hint}see internvl.zoo.official_names() for all {len(files)}"
        )
    file_name = files[name.lower()]
    config = json.loads((_CONFIGS / file_name).read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}
