"""An InternVL chat model assembled from its parts, as the official trainer builds one without a checkpoint.

`--vision_path` names an InternViT folder (InternViT-300M-448px, InternViT-6B-448px-V2_5, ...), `--llm_path` an LLM
folder of an architecture in `internvl.archs` (its own class loads it; nothing in the folder is executed), and the
projector `mlp1` starts from PyTorch's default initialisation, or from `--mlp_path`: a state dict of `mlp1` alone
(keys `0.weight` ... `3.bias`), as the official pre-training stages save it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from internvl.archs import llm_arch, resolve
from internvl.model.chat_config import InternVLChatConfig
from internvl.model.internvl_chat import InternVLChatModel
from internvl.model.vision import InternVisionConfig, InternVisionModel


def _folder_config(folder: str | os.PathLike, option: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{option} {folder}: no config.json; expected a model folder")
    return json.loads(path.read_text())


def load_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A saved `mlp1` state dict (plain tensors only: nothing pickled is executed)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--mlp_path {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError depending on the version
        raise ValueError(f"--mlp_path {path}: not a state dict of plain tensors ({error})") from None


def assemble_model(vision_path: str | os.PathLike, llm_path: str | os.PathLike, mlp_path: str | os.PathLike | None,
                   dtype: torch.dtype, drop_path_rate: float = 0.0, **settings) -> InternVLChatModel:
    """The chat model of the ViT at `vision_path` and the LLM at `llm_path`; `settings` are `InternVLChatConfig`
    fields (template, downsample_ratio, force_image_size, ...)."""
    vision_config = InternVisionConfig(**_folder_config(vision_path, "--vision_path"))
    vision_config.drop_path_rate = drop_path_rate
    vision = InternVisionModel.from_pretrained(vision_path, config=vision_config, dtype=dtype)
    architectures = _folder_config(llm_path, "--llm_path").get("architectures") or [None]
    llm = resolve(llm_arch(architectures[0]).model_class).from_pretrained(llm_path, dtype=dtype)
    config = InternVLChatConfig(vision_config.to_dict(), llm.config.to_dict(), **settings)
    model = InternVLChatModel(config, vision_model=vision, language_model=llm).to(dtype)
    if mlp_path is not None:
        try:
            model.mlp1.load_state_dict(load_projector(mlp_path))
        except RuntimeError as error:  # missing, unexpected or mis-sized keys
            raise ValueError(f"--mlp_path {mlp_path}: does not fit this mlp1: {str(error).splitlines()[-1].strip()}"
                             ) from None
    return model
