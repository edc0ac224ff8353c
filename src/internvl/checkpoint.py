"""Read and write checkpoint folders in the official InternVL format, executing nothing found in them.

A folder in transformers' native format ("-hf", `model_type: internvl`) is read too: its config comes back as the
official one (`internvl.hf_format`); its weights are returned as stored, for the caller to map.

A folder holds `config.json` and the weights as one `model.safetensors` or as shards listed in
`model.safetensors.index.json` (pickled `pytorch_model*.bin` files are read with `weights_only=True`).
Writes go to a temporary folder that is renamed into place, so a killed run never leaves a half-written
checkpoint behind; that rename replaces a non-empty folder only when the caller says it may, and what it leaves
follows the user's umask (safetensors writes files 0600, tempfile makes folders 0700: unreadable to a serving
container running as another user).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from internvl import hf_format

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
# Files besides the weights that travel with a model: its tokenizer, generation settings, and the official
# Python files (copied, never run) so that the official code and vLLM can load what we write.
COMPANION_PATTERNS = ("tokenizer*", "*.model", "vocab.json", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "generation_config.json", "*.py", "preprocessor_config.json")


def read_json_config(folder: str | os.PathLike) -> dict:
    """The `config.json` of a checkpoint folder as it is written, in either format (`model_type` `internvl_chat`:
    official; `internvl`: transformers' "-hf"); anything else is refused."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; expected an InternVL checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if config.get("model_type") not in ("internvl_chat", hf_format.HF_MODEL_TYPE):
        raise ValueError(
            f"{path}: model_type is {config.get('model_type')!r}, expected 'internvl_chat' or 'internvl' "
            "(an InternVL chat checkpoint, official or transformers' -hf, not a bare LLM or ViT)"
        )
    return config


def folder_format(folder: str | os.PathLike) -> str:
    """"hf" for a transformers-format ("-hf") InternVL folder, "original" for the official format."""
    return "hf" if read_json_config(folder)["model_type"] == hf_format.HF_MODEL_TYPE else "original"


def read_config(folder: str | os.PathLike) -> dict:
    """The official `config.json` dict of an InternVL chat checkpoint folder; a "-hf" folder's config converted."""
    config = read_json_config(folder)
    if config["model_type"] != hf_format.HF_MODEL_TYPE:
        return config
    try:
        return hf_format.original_config(config)
    except hf_format.NotConvertible as error:
        raise ValueError(f"{Path(folder) / CONFIG_NAME}: {error}") from None


def existing_config(folder: str | os.PathLike) -> dict | None:
    """The config of the InternVL chat checkpoint `folder` holds; None when it holds none (or an unreadable one)."""
    try:
        return read_config(folder)
    except (FileNotFoundError, ValueError):
        return None


def _weight_files(folder: Path) -> list[Path]:
    for index_name in (SAFE_INDEX, PICKLE_INDEX):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / name for name in names]
    for name in (SAFE_WEIGHTS, PICKLE_WEIGHTS):
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder}: no weights ({SAFE_WEIGHTS}, {SAFE_INDEX} or {PICKLE_WEIGHTS})")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError depending on the version
        raise ValueError(
            f"{path}: refused to unpickle: the file holds more than plain tensors, and loading it could run "
            f"arbitrary code ({error}). Convert it to safetensors with a trusted tool first."
        ) from error


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a ValueError naming the file when it is truncated or corrupt (the
    library's own error names no file)."""
    try:
        with safe_open(path, framework="pt") as reader:
            return {key: reader.get_tensor(key) for key in reader.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({error})") from None


def load_state_dict(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint folder, floating-point tensors cast to `dtype` when given."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(folder)):
        part = read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
        for key, tensor in part.items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor
    return state


def checkpoint_dtype(config: dict) -> torch.dtype | None:
    """The dtype the checkpoint's weights were saved in, as its config records it."""
    name = config.get("torch_dtype") or config.get("dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give each path, and everything below a folder, the mode a plain `mkdir` or `open` gives under the umask."""
    umask = os.umask(0)  # reading the umask means setting it; put straight back
    os.umask(umask)
    for path in map(Path, paths):
        for item in (path, *path.rglob("*")) if path.is_dir() else (path,):
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder next to `target`; on success it takes `target`'s place in one rename.

    `target` must be new or an empty folder, unless `replace`: the caller has checked that what it holds may go.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: is a file, not a folder")
    occupied = target.is_dir() and any(target.iterdir())
    if occupied and not replace:
        raise ValueError(f"{target}: not empty; refusing to replace what it holds")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        follow_umask(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if occupied:
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)  # onto an empty folder too


def save_state_dict(
    state: dict[str, torch.Tensor], folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    """Write `state` into `folder` as safetensors, sharded with an index like `save_pretrained`.

    Tensors that share memory (tied embeddings) are written once, under the first name, as transformers does.
    """
    folder = Path(folder)
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.device.type != "meta" and identity in seen:
            continue
        seen.add(identity)
        tensors[key] = tensor.detach().contiguous().cpu()
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], folder / SAFE_WEIGHTS, metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_companion_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy tokenizer, generation-config and official code files from `source` to `target`; return names."""
    source, target = Path(source), Path(target)
    copied = []
    for pattern in COMPANION_PATTERNS:
        for path in sorted(source.glob(pattern)):
            if path.is_file() and not (target / path.name).exists():
                shutil.copy2(path, target / path.name)
                copied.append(path.name)
    return copied


# Qwen3-MoE checkpoints store one Linear per expert; transformers 5 fuses them into 3-D parameters
# (gate and up concatenated on the output dimension). Converted on the way in and back on the way out, so the
# files keep the official key names.
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts\.)(?:base_layer\.)*(?P<name>gate_up_proj|down_proj)$")


def fuse_expert_weights(state: dict[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """Stack per-expert checkpoint weights into the model's fused expert parameters, where it has them."""
    for model_key in model_keys:
        match = _FUSED_EXPERTS.match(model_key)
        if not match or model_key in state:
            continue
        prefix = match["prefix"]
        projections = ("gate_proj", "up_proj") if match["name"] == "gate_up_proj" else ("down_proj",)
        experts = sorted(
            {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix) and k[len(prefix)].isdigit()}
        )
        if not experts:
            continue
        stacked = [
            torch.cat([state.pop(f"{prefix}{e}.{proj}.weight") for proj in projections], dim=0) for e in experts
        ]
        state[model_key] = torch.stack(stacked)
    return state


def split_expert_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `fuse_expert_weights`: one `experts.{e}.{gate,up,down}_proj.weight` per expert."""
    out = {}
    for key, tensor in state.items():
        match = _FUSED_EXPERTS.match(key)
        if not match or tensor.dim() != 3:
            out[key] = tensor
            continue
        prefix = match["prefix"]
        for expert, weight in enumerate(tensor):
            if match["name"] == "gate_up_proj":
                gate, up = weight.chunk(2, dim=0)
                out[f"{prefix}{expert}.gate_proj.weight"] = gate
                out[f"{prefix}{expert}.up_proj.weight"] = up
            else:
                out[f"{prefix}{expert}.down_proj.weight"] = weight
    return out
