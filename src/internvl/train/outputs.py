"""What a fine-tune writes: standard PEFT adapters, the other trained weights, the tokenizer and a manifest.

An output folder (the final one and every `checkpoint-N`) holds
- `llm_adapter/`, `vision_adapter/`: PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`) that
  `peft.PeftModel.from_pretrained` loads onto the base language model or ViT;
- `trained_weights.safetensors`: weights trained outside LoRA (projector, unfrozen ViT layers), official names;
- the tokenizer files;
- `manifest.json`: the base model (path and a hash of its config) and the ranks, checked on every load.
With `--save_full_model`, the final folder also holds `full_model/`: the merged model in the official format.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from internvl import __version__, checkpoint

MANIFEST = "manifest.json"
TRAINED_WEIGHTS = "trained_weights.safetensors"
FULL_MODEL = "full_model"  # the merged model, official format (--save_full_model)
ADAPTER_DIRS = {"language_model": "llm_adapter", "vision_model": "vision_adapter"}
_RANK_FIELDS = {"language_model": "use_llm_lora", "vision_model": "use_backbone_lora"}


# Keys that name no property of the weights: where they were loaded from, how they were trained, their dtype.
_NOT_HASHED = {"_name_or_path", "use_llm_lora", "use_backbone_lora", "transformers_version", "dtype", "torch_dtype",
               "drop_path_rate", "use_cache"}


def _weights_config(config):
    if isinstance(config, dict):
        return {k: _weights_config(v) for k, v in config.items() if k not in _NOT_HASHED}
    return config


def config_hash(config: dict) -> str:
    """A stable hash of a model config, naming the base model an adapter belongs to (training-only settings such as
    the ViT's drop_path_rate, set by --drop_path_rate, are left out)."""
    canonical = json.dumps(_weights_config(config), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def trained_non_lora_weights(model: torch.nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Trainable parameters that are not LoRA weights, under their names in `model`; values from `state_dict`."""
    weights = dict(model.named_parameters()) if state_dict is None else state_dict
    return {
        name: weights[name].detach()
        for name, param in model.named_parameters()
        if param.requires_grad and "lora_" not in name and "modules_to_save" not in name
    }


def save_outputs(model, folder: str | os.PathLike, base_config: dict, base_path: str | None, tokenizer=None,
                 state_dict: dict | None = None) -> None:
    """Write the adapters, other trained weights, tokenizer and manifest of `model` into `folder`.

    `state_dict` (the whole model's, or at least its trainable weights, keyed as `model.state_dict()`) replaces the
    model's own weights: FSDP and DeepSpeed ZeRO-3 leave each rank only a shard of every parameter, gathered first.
    """
    if state_dict is not None:
        missing = [name for name, param in model.named_parameters() if param.requires_grad and name not in state_dict]
        if missing:
            raise ValueError(f"refusing to write adapters to {folder}: the gathered weights lack {len(missing)} "
                             f"trainable weights (first: {missing[0]})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for part, subdir in ADAPTER_DIRS.items():
        module = getattr(model, part)
        if isinstance(module, PeftModel):
            prefix = f"{part}."
            part_state = None if state_dict is None else {
                key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)
            }
            module.save_pretrained(folder / subdir, state_dict=part_state)
            config = module.peft_config["default"]
            parts[part] = {"adapter": subdir, "r": config.r, "lora_alpha": config.lora_alpha}
    extra = trained_non_lora_weights(model, state_dict)
    if extra:
        save_file({k: v.contiguous().cpu() for k, v in extra.items()}, folder / TRAINED_WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifest = {
        "format": "internvl-lora adapters",
        "version": __version__,
        "base_model": base_path,
        "base_config_hash": config_hash(base_config),
        "lora": parts,
        "trained_weights": sorted(extra),
        "template": model.template,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def save_merged_model(model, folder: str | os.PathLike, *companion_sources: str | os.PathLike | None) -> list[str]:
    """Fold `model`'s LoRA adapters into its weights (in place), write it to `folder` in the official format, and
    copy the tokenizer, generation config and official code from the first of `companion_sources` that has
    each (None skipped), so the folder is a complete checkpoint. Returns the names of the files copied."""
    model.merge_lora()
    model.save_pretrained(folder)
    return [name for source in companion_sources if source is not None
            for name in checkpoint.copy_companion_files(source, folder)]


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of an adapter folder, with a clear error when the folder is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; not an adapter folder written by internvl-lora")
    return json.loads(path.read_text())


def check_base(manifest: dict, folder, base_config: dict, force: bool = False) -> None:
    """Refuse adapters trained on another base model (config hash differs) unless `force`."""
    expected, actual = manifest["base_config_hash"], config_hash(base_config)
    if expected != actual and not force:
        raise ValueError(
            f"{folder}: these adapters were trained on base model {manifest.get('base_model')!r} "
            f"(config hash {expected}), but the model given has config hash {actual}. Pass the right base model, "
            "or force it (--force_base_model) if you know the weights are compatible."
        )


def _load_trained_weights(model, folder: Path, manifest: dict) -> None:
    if not manifest["trained_weights"]:
        return
    weights = load_file(folder / TRAINED_WEIGHTS)
    missing = set(manifest["trained_weights"]) - set(weights)
    if missing:
        raise ValueError(f"{folder / TRAINED_WEIGHTS}: lacks {sorted(missing)[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def load_outputs_into(model, folder: str | os.PathLike) -> None:
    """Load the adapter weights and other trained weights of `folder` into an already wrapped `model`."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for part, info in manifest["lora"].items():
        module = getattr(model, part)
        if not isinstance(module, PeftModel):
            raise ValueError(f"{folder}: has a LoRA adapter for {part}, but the model's {part} has no LoRA")
        weights = load_file(folder / info["adapter"] / "adapter_model.safetensors")
        result = set_peft_model_state_dict(module, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}/{info['adapter']}: weights unknown to the model: {result.unexpected_keys[:5]}")
    _load_trained_weights(model, folder, manifest)


def load_adapter(model, folder: str | os.PathLike, force: bool = False) -> None:
    """Put the adapters of `folder` onto a base `model` (refused when trained on another base unless `force`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_base(manifest, folder, model.config.to_dict(), force)
    for part, info in manifest["lora"].items():
        module = getattr(model, part)
        if isinstance(module, PeftModel):
            raise ValueError(f"the model's {part} already carries LoRA adapters; load {folder} onto a base model")
        setattr(model, part, PeftModel.from_pretrained(module, folder / info["adapter"]))
        setattr(model.config, _RANK_FIELDS[part], info["r"])
    _load_trained_weights(model, folder, manifest)
