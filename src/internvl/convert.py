"""`internvl-lora convert`: a checkpoint folder, or a fine-tune's output folder, from one format to the other.

The formats are the official InternVL one and transformers' native InternVL ("-hf"); the mapping is
`internvl.hf_format`'s tables. A model keeps every weight bit for bit (packed q/k/v split and joined, nothing
cast), so original -> hf -> original gives back the same tensors; its tokenizer and generation config come along.
An output folder's adapters are converted where the mapping is exact and refused otherwise; its other files
(manifest, trained weights, tokenizer) are copied. Everything is written through a staging folder renamed into
place, onto a new or empty folder only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from internvl import checkpoint, hf_format
from internvl.data.constants import IMG_CONTEXT_TOKEN
from internvl.model.chat_config import InternVLChatConfig
from internvl.train import outputs


def image_token_id(folder: str | os.PathLike, vocab_size: int) -> int:
    """The id of `<IMG_CONTEXT>` in the tokenizer of `folder` (transformers' `image_token_id`), checked to lie in
    the model's vocabulary."""
    from internvl.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder}: no readable tokenizer, which gives the {IMG_CONTEXT_TOKEN} id -hf records as "
                         f"image_token_id ({error})") from None
    token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if not isinstance(token_id, int) or token_id >= vocab_size:
        raise ValueError(f"{folder}: the tokenizer's {IMG_CONTEXT_TOKEN} id {token_id} is not within the model's "
                         f"vocabulary of {vocab_size}")
    return token_id


def _check_target(target: Path, *sources) -> None:
    for source in filter(None, sources):
        a, b = target.resolve(), Path(source).resolve()
        if a == b or b in a.parents or a in b.parents:
            raise ValueError(f"{target}: overlaps {source}; write the converted folder elsewhere")


def convert_model(source: str | os.PathLike, target: str | os.PathLike, to: str) -> list[str]:
    """Write the checkpoint `source` into the new or empty folder `target` in format `to` ("hf" or "original");
    returns the companion files (tokenizer, generation config) copied along."""
    source, target = Path(source), Path(target)
    _check_target(target, source)
    current = checkpoint.folder_format(source)
    if current == to:
        raise ValueError(f"{source}: already in the {to} format")
    config = checkpoint.read_config(source)
    state = checkpoint.load_state_dict(source)  # as stored: nothing cast
    try:
        if to == "hf":
            written = hf_format.hf_config(config, image_token_id(source, config["llm_config"]["vocab_size"]))
            state = hf_format.hf_state(state, config["llm_config"])
        else:
            expected = checkpoint.read_json_config(source)["image_token_id"]
            vocab_size = config["llm_config"]["vocab_size"]
            if (source / "tokenizer_config.json").is_file() and image_token_id(source, vocab_size) != expected:
                raise ValueError(f"{source}: its tokenizer's {IMG_CONTEXT_TOKEN} is not image_token_id {expected}; "
                                 "the official format finds the image slots by that token's name")
            written = InternVLChatConfig.from_dict(config).to_dict()
            state = hf_format.original_state(state, config["llm_config"])
    except hf_format.NotConvertible as error:
        raise ValueError(f"{source}: cannot convert to the {to} format: {error}") from None
    with checkpoint.atomic_directory(target) as staging:
        (staging / checkpoint.CONFIG_NAME).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        checkpoint.save_state_dict(state, staging)
        return checkpoint.copy_companion_files(source, staging)


def convert_run(source: str | os.PathLike, target: str | os.PathLike, to: str, base: str | os.PathLike | None = None,
                force: bool = False) -> None:
    """Write the fine-tune output folder `source` into the new or empty `target` with its adapters in format `to`.

    `base` (default: the base model its manifest names) gives the LLM's shape, which splitting InternLM2's packed
    q/k/v needs, and is checked to be the adapters' base unless `force`.
    """
    source, target = Path(source), Path(target)
    _check_target(target, source)
    manifest = outputs.read_manifest(source)
    current = manifest.get("base_format", "original")
    if current == to:
        raise ValueError(f"{source}: its adapters are already in the {to} format")
    base_config = outputs.checked_base_config(manifest, source, base, force)
    llm_config = base_config["llm_config"]
    adapter_dirs = {info["adapter"] for info in manifest["lora"].values()}
    with checkpoint.atomic_directory(target) as staging:
        for item in source.iterdir():
            if item.name in adapter_dirs or item.name == outputs.MANIFEST:
                continue
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, staging / item.name)
        for part, info in manifest["lora"].items():
            config, weights = outputs.read_adapter(source / info["adapter"], part, current, llm_config)
            if to == "hf":
                config, weights = outputs.hf_adapter(config, weights, part, llm_config, str(source / info["adapter"]))
            outputs.write_adapter(staging / info["adapter"], config, weights)
        (staging / outputs.MANIFEST).write_text(json.dumps({**manifest, "base_format": to}, indent=2) + "\n")


def convert(source: str | os.PathLike, target: str | os.PathLike, to: str, base=None, force: bool = False) -> str:
    """Convert a checkpoint folder or a fine-tune output folder (one with a manifest); returns which it was."""
    if to not in hf_format.FORMATS:
        raise ValueError(f"--to {to}: must be one of {', '.join(hf_format.FORMATS)}")
    if (Path(source) / outputs.MANIFEST).is_file():
        convert_run(source, target, to, base, force)
        return "adapters"
    convert_model(source, target, to)
    return "model"
