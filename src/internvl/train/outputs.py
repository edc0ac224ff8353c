"""What a fine-tune writes, how it goes back onto a model, and the merged model.

An output folder (the final one and every `checkpoint-N`) holds
- `llm_adapter/`, `vision_adapter/`: PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`) that
  `peft.PeftModel.from_pretrained` loads onto the base language model or ViT; on a base in transformers' "-hf"
  format, onto its whole `InternVLForConditionalGeneration` (the manifest's `base_format`; `read_adapter` maps
  them back exactly);
- `trained_weights.safetensors`: weights trained outside LoRA (projector, unfrozen ViT layers), under the official
  names even where PEFT wraps their part, so that they load into a base model as they are;
- `resized_embeddings.safetensors`: when the tokenizer outgrew the base vocabulary, the rows the run added to the
  input embedding and output head (frozen, yet the base lacks them);
- the tokenizer files;
- `manifest.json`: the base model (path and a hash of its config), the ranks, the vocabulary sizes and what serving
  must repeat of the run (`ServingSettings`: template, tiling, ViT feature path). `load_adapter` checks and applies
  it all to a base model (chat, merge); `load_outputs_into` reloads a checkpoint into a resumed run.
With `--save_full_model`, the final folder also holds `full_model/`: the merged model in the official format. A
merged model's config.json records what was merged in (`merged_lora`): an adapter is refused on it, and a merge
replaces an existing folder only when it is such a model. Everything written follows the user's umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from internvl import __version__, checkpoint, hf_format
from internvl.data.templates import get_conv_template
from internvl.data.tiling import dynamic_preprocess, tiles_to_tensor
from internvl.model.projector import num_image_tokens

MANIFEST = "manifest.json"
TRAINED_WEIGHTS = "trained_weights.safetensors"
RESIZED_EMBEDDINGS = "resized_embeddings.safetensors"
FULL_MODEL = "full_model"  # the merged model, official format (--save_full_model)
ADAPTER_DIRS = {"language_model": "llm_adapter", "vision_model": "vision_adapter"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's name
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name
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


@dataclass(frozen=True)
class ServingSettings:
    """What serving must repeat of a fine-tune: the chat template, how images become tiles, and which ViT features
    reach the LLM and how. The official names of the config fields that hold them."""

    template: str
    force_image_size: int  # tile side in pixels
    dynamic_image_size: bool
    use_thumbnail: bool
    min_dynamic_patch: int
    max_dynamic_patch: int
    ps_version: str
    select_layer: int
    downsample_ratio: float
    normalize_type: str = "imagenet"  # the tiles' mean and std (official --normalize_type); not in official configs

    @classmethod
    def from_model(cls, model) -> ServingSettings:
        """The settings `model` runs with (its config, with the tile size and template it resolves)."""
        values = {field.name: getattr(model.config, field.name, field.default) for field in fields(cls)}
        return cls(**{**values, "force_image_size": model.config.image_size, "template": model.template})

    def apply_to(self, model) -> None:
        """Make `model` run with these settings, config included (a merged model saves them), resizing the ViT's
        position embedding to the tile size as the official `force_image_size` does."""
        config, vision = model.config, model.config.vision_config
        if self.force_image_size != vision.image_size:
            model.vision_model.resize_pos_embeddings(vision.image_size, self.force_image_size, vision.patch_size)
        for name, value in asdict(self).items():
            setattr(config, name, value)
        model.template, model.select_layer = self.template, self.select_layer
        model.ps_version, model.downsample_ratio = self.ps_version, self.downsample_ratio
        model.num_image_token = num_image_tokens(self.force_image_size, vision.patch_size, self.downsample_ratio)
        model.conv_template = get_conv_template(self.template)
        model.system_message = model.conv_template.system_message

    def image_tiles(self, image: Image.Image) -> torch.Tensor:
        """An RGB image as the fine-tune fed it: [tiles, 3, size, size] (one tile without dynamic_image_size)."""
        size = self.force_image_size
        tiles = [image]
        if self.dynamic_image_size:
            tiles = dynamic_preprocess(image, self.min_dynamic_patch, self.max_dynamic_patch, size, self.use_thumbnail)
        return tiles_to_tensor(tiles, size, self.normalize_type)


# PEFT puts a wrapped part under `base_model.model.` and a wrapped linear's own weight under `base_layer.`.
_PEFT_WRAPPING = re.compile(r"\.base_model\.model(?=\.)|\.base_layer(?=\.)")


def official_name(name: str) -> str:
    """A parameter's name as the official checkpoints have it, PEFT's wrapping taken out."""
    return _PEFT_WRAPPING.sub("", name)


def _is_adapter_weight(name: str) -> bool:
    """Whether a parameter belongs to a PEFT adapter file rather than to the model's own weights."""
    return "lora_" in name or "modules_to_save" in name


def saved_parameters(model, base_config: dict) -> dict[str, torch.nn.Parameter]:
    """Every parameter `save_outputs` writes, by its name in `model`: the trainable ones (LoRA and others) and,
    when the vocabulary grew past the base's, the input embedding and output head, which hold rows the base lacks.
    Under DeepSpeed ZeRO-3 these are the ones to gather before `save_outputs`."""
    embeddings = {f"language_model.{model.arch.embed_tokens}.weight", f"language_model.{model.arch.lm_head}.weight"}
    grew = model.config.llm_config.vocab_size > base_config["llm_config"]["vocab_size"]
    return {name: param for name, param in model.named_parameters()
            if param.requires_grad or (grew and official_name(name) in embeddings)}


def save_outputs(model, folder: str | os.PathLike, base_config: dict, base_path: str | None, tokenizer=None,
                 state_dict: dict | None = None) -> None:
    """Write the adapters, other trained weights, resized embedding rows, tokenizer and manifest of `model` into
    `folder`; `base_config` is the config of the base model before the run changed anything.

    `state_dict` (the whole model's, or at least the `saved_parameters`, keyed as `model.state_dict()`) replaces the
    model's own weights: FSDP and DeepSpeed ZeRO-3 leave each rank only a shard of every parameter, gathered first.
    """
    saved = saved_parameters(model, base_config)
    if state_dict is not None:
        missing = [name for name in saved if name not in state_dict]
        if missing:
            raise ValueError(f"refusing to write adapters to {folder}: the gathered weights lack {len(missing)} "
                             f"trainable weights (first: {missing[0]})")
    weights = {name: (param if state_dict is None else state_dict[name]).detach() for name, param in saved.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, parts = [], {}
    for part, subdir in ADAPTER_DIRS.items():
        module = getattr(model, part)
        if isinstance(module, PeftModel):
            prefix = f"{part}."
            part_state = None if state_dict is None else {
                key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)
            }
            module.save_pretrained(folder / subdir, state_dict=part_state)
            if model.checkpoint_format == "hf":  # the adapter of a "-hf" base is one of transformers' InternVL
                config, adapter = read_adapter(folder / subdir, part, "original", {})
                write_adapter(folder / subdir, *hf_adapter(config, adapter, part, model.config.to_dict()["llm_config"],
                                                          str(folder / subdir)))
            written.append(folder / subdir)
            config = module.peft_config["default"]
            parts[part] = {"adapter": subdir, "r": config.r, "lora_alpha": config.lora_alpha}
    base_vocab = base_config["llm_config"]["vocab_size"]
    files = {  # a trained embedding is in the trained weights whole; a frozen one saved only holds new rows
        TRAINED_WEIGHTS: {official_name(name): weight for name, weight in weights.items()
                          if saved[name].requires_grad and not _is_adapter_weight(name)},
        RESIZED_EMBEDDINGS: {official_name(name): weight[base_vocab:] for name, weight in weights.items()
                             if not saved[name].requires_grad},
    }
    for file, tensors in files.items():
        if tensors:
            save_file({name: tensor.contiguous().cpu() for name, tensor in tensors.items()}, folder / file)
            written.append(folder / file)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifest = {
        "format": "internvl-lora adapters",
        "version": __version__,
        "base_model": base_path,
        "base_config_hash": config_hash(base_config),
        "base_format": model.checkpoint_format,  # of the adapters: "original", or "hf" (transformers' InternVL)
        "lora": parts,
        "trained_weights": sorted(files[TRAINED_WEIGHTS]),
        "resized_embeddings": sorted(files[RESIZED_EMBEDDINGS]),
        "vocab_size": {"base": base_vocab, "trained": model.config.llm_config.vocab_size},
        "serving": asdict(ServingSettings.from_model(model)),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    checkpoint.follow_umask(*written)


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of an adapter folder, with a clear error when the folder is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; not an adapter folder written by internvl-lora")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None


def read_base_config(folder: str | os.PathLike) -> dict:
    """The config of the base model folder `folder` (either format) as a model loaded from it reports it: what
    manifests hash."""
    from internvl.model.chat_config import InternVLChatConfig

    return InternVLChatConfig.from_dict(checkpoint.read_config(folder)).to_dict()


def checked_base_config(manifest: dict, folder, base: str | None = None, force: bool = False) -> dict:
    """The config of the base model the adapters in `folder` go on (`base`, else the one their manifest names),
    checked as `check_base` does."""
    base = base or manifest.get("base_model")
    if not base:
        raise ValueError(f"{folder}: its manifest names no base model; pass --base MODEL")
    base_config = read_base_config(base)
    check_base(manifest, folder, base_config, force)
    return base_config


def check_base(manifest: dict, folder, base_config: dict, force: bool = False) -> None:
    """Refuse adapters trained on another base model (config hash differs), or put onto a model that has LoRA merged
    in (which hashes apart from its base), unless `force`."""
    expected, actual = manifest["base_config_hash"], config_hash(base_config)
    if expected == actual or force:
        return
    merged = base_config.get("merged_lora")
    if merged:
        raise ValueError(
            f"{folder}: the model given already has LoRA merged in (from {merged[-1]['from']}); putting these adapters "
            f"on it would apply LoRA twice. Put them on their base model {manifest.get('base_model')!r}, or force it "
            "(--force_base_model) if you mean to add them on top."
        )
    raise ValueError(
        f"{folder}: these adapters were trained on base model {manifest.get('base_model')!r} "
        f"(config hash {expected}), but the model given has config hash {actual}. Pass the right base model, "
        "or force it (--force_base_model) if you know the weights are compatible."
    )


def check_ranks(manifest: dict, folder, run) -> None:
    """Refuse to resume from `folder` with other LoRA ranks than it was trained with (the weights would not fit).

    `run` has the ranks asked for as `use_llm_lora` and `use_backbone_lora` (the `ModelArguments`, or the wrapped
    model's config)."""
    for part, field in _RANK_FIELDS.items():
        saved, asked = manifest["lora"].get(part, {}).get("r", 0), getattr(run, field)
        if saved != asked:
            raise ValueError(
                f"{folder}: this checkpoint was trained with --{field} {saved}, but this run asks for --{field} "
                f"{asked}; resume with --{field} {saved}, or start afresh in another --output_dir"
            )


def _check_shapes(path: Path, weights: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
    """Every tensor of the file `path` must name one of `targets` and have its shape."""
    for name, tensor in weights.items():
        if name not in targets:
            raise ValueError(f"{path}: {name} names no weight of the model")
        if tensor.shape != targets[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model's {tuple(targets[name].shape)}: these "
                "weights were trained on a base model of other sizes"
            )


def read_adapter(adapter_dir: str | os.PathLike, part: str, checkpoint_format: str, llm_config: dict
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The `adapter_config.json` dict and weights of one adapter folder of `part`, in our form (keys of the part
    alone, official module names): an adapter in the "-hf" format is converted (exactly, or refused)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    config = json.loads(config_path.read_text())
    weights = checkpoint.read_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    if checkpoint_format == "hf":
        try:
            hf_format.check_plain_lora(config, str(config_path))
            weights = hf_format.original_adapter_states(weights, llm_config, str(adapter_dir)).get(part, {})
        except hf_format.NotConvertible as error:
            raise ValueError(str(error)) from None
        config = {**config, "target_modules": hf_format.original_target_modules(weights)}
    return config, weights


def write_adapter(adapter_dir: str | os.PathLike, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """Write an adapter folder as PEFT does: `adapter_config.json` and `adapter_model.safetensors`."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({key: tensor.contiguous().cpu() for key, tensor in weights.items()}, adapter_dir / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})


def hf_adapter(config: dict, weights: dict[str, torch.Tensor], part: str, llm_config: dict, path: str = "adapter"
               ) -> tuple[dict, dict[str, torch.Tensor]]:
    """One of our adapters (config dict and weights) as a PEFT adapter of transformers' whole
    `InternVLForConditionalGeneration`; refused where the mapping would not be exact."""
    try:
        hf_format.check_plain_lora(config, path)
        weights = hf_format.hf_adapter_state(weights, part, llm_config, path)
    except hf_format.NotConvertible as error:
        raise ValueError(str(error)) from None
    return {**config, "target_modules": hf_format.hf_target_modules(weights)}, weights


def _lora_config(config: dict) -> LoraConfig:
    known = {field.name for field in fields(LoraConfig)}
    return LoraConfig(**{key: value for key, value in config.items() if key in known})


def _load_adapter_weights(module: PeftModel, path: Path, weights: dict[str, torch.Tensor]) -> None:
    _check_shapes(path, weights, get_peft_model_state_dict(module))
    set_peft_model_state_dict(module, weights)


def _put_adapter(module: torch.nn.Module, adapter_dir: Path, config: dict, weights: dict[str, torch.Tensor]
                 ) -> PeftModel:
    """`module` wrapped in the PEFT adapter `config` (saved for inference: frozen), `weights` checked and loaded; in
    the mode `module` was (PEFT's new dropout layers start in training mode)."""
    wrapped = get_peft_model(module, _lora_config(config))
    _load_adapter_weights(wrapped, adapter_dir / ADAPTER_WEIGHTS, weights)
    return wrapped.train(module.training)


def _load_weight_files(model, folder: Path, manifest: dict) -> None:
    """Copy the trained weights, and the resized embeddings' new rows, of `folder` into `model`."""
    # Files of earlier versions may name a wrapped part's weights as PEFT does: both names are known.
    params = {alias: param for name, param in model.named_parameters() for alias in (name, official_name(name))}
    for file in (TRAINED_WEIGHTS, RESIZED_EMBEDDINGS):
        names = manifest.get(Path(file).stem)  # each file's tensors are listed under its stem
        if not names:
            continue
        first_row = manifest["vocab_size"]["base"] if file == RESIZED_EMBEDDINGS else 0  # the new rows only
        path = folder / file
        weights = checkpoint.read_safetensors(path)
        missing = sorted(set(names) - set(weights))
        if missing:
            raise ValueError(f"{path}: lacks {missing[:5]}")
        targets = {name: params[name][first_row:] if first_row else params[name]
                   for name in weights if name in params}
        _check_shapes(path, weights, targets)
        with torch.no_grad():
            for name, tensor in weights.items():
                targets[name].copy_(tensor)


def load_outputs_into(model, folder: str | os.PathLike) -> None:
    """Load the adapter weights and other trained weights of `folder` into `model`, wrapped by a resumed run."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_ranks(manifest, folder, model.config)
    for part, info in manifest["lora"].items():
        _, weights = read_adapter(folder / info["adapter"], part, manifest.get("base_format", "original"),
                                  model.config.to_dict()["llm_config"])
        _load_adapter_weights(getattr(model, part), folder / info["adapter"] / ADAPTER_WEIGHTS, weights)
    _load_weight_files(model, folder, manifest)


def load_adapter(model, folder: str | os.PathLike, force: bool = False) -> None:
    """Put the outputs of `folder` onto a base `model`: its serving settings and vocabulary, then its adapters and
    trained weights. Refused when trained on another base, or onto a model with LoRA merged in, unless `force`.

    Manifests of earlier versions lack the serving settings and vocabulary: the model's own stay.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_base(manifest, folder, model.config.to_dict(), force)
    for part in manifest["lora"]:
        if isinstance(getattr(model, part), PeftModel):
            raise ValueError(f"the model's {part} already carries LoRA adapters; load {folder} onto a base model")
    if "serving" in manifest:
        ServingSettings(**manifest["serving"]).apply_to(model)
    if "vocab_size" in manifest:
        model.language_model.resize_token_embeddings(manifest["vocab_size"]["trained"], mean_resizing=False)
    llm_config = model.config.to_dict()["llm_config"]
    for part, info in manifest["lora"].items():
        config, weights = read_adapter(folder / info["adapter"], part, manifest.get("base_format", "original"),
                                       llm_config)
        setattr(model, part, _put_adapter(getattr(model, part), folder / info["adapter"], config, weights))
        setattr(model.config, _RANK_FIELDS[part], info["r"])
    _load_weight_files(model, folder, manifest)


def check_merge_output(folder: str | os.PathLike, overwrite: bool = False, inputs=()) -> bool:
    """Refuse a folder for a merged model where writing it would lose data; return whether it replaces one.

    `folder` must be new or empty, or (with `overwrite`) a model merged before (its config.json records
    `merged_lora`): never a file, another model or anything else, nor one of `inputs` (the model and adapter
    folders merged; None skipped), inside one or around one.
    """
    folder = Path(folder)
    for source in filter(None, inputs):
        a, b = folder.resolve(), Path(source).resolve()
        if a == b or b in a.parents or a in b.parents:
            raise ValueError(f"{folder}: overlaps {source}, which is being merged; write the merged model elsewhere")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file, not a folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return False
    if not overwrite:
        raise ValueError(f"{folder}: not empty; pass a new folder (--overwrite replaces only a model merged here)")
    if not (checkpoint.existing_config(folder) or {}).get("merged_lora"):
        raise ValueError(f"{folder}: not a model merged by internvl-lora (no merged_lora in a config.json), so "
                         "--overwrite does not replace it; pass a new folder")
    return True


def save_merged_model(model, folder: str | os.PathLike, source: str | os.PathLike,
                      *companion_sources: str | os.PathLike | None, overwrite: bool = False) -> tuple[dict, list[str]]:
    """Fold `model`'s LoRA adapters into its weights (in place) and write it to `folder` in the official format.

    `source` is what was merged (the adapter folder, or the LoRA checkpoint), recorded in config.json's
    `merged_lora`. The tokenizer, generation config and official code come from the first of `source` and
    `companion_sources` (None skipped) that has each, so the folder is a complete checkpoint. `folder` is checked
    by `check_merge_output` and written through a staging folder renamed into place. Returns the merge record and
    the names of the files copied.
    """
    replace = check_merge_output(folder, overwrite)
    record = model.merge_lora(source)
    with checkpoint.atomic_directory(folder, replace=replace) as staging:
        model.save_pretrained(staging)
        copied = [name for companion in (source, *companion_sources) if companion is not None
                  for name in checkpoint.copy_companion_files(companion, staging)]
    return record, copied
