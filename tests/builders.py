"""Builders of tiny real InternVL models and batches, shared by the tests."""

from __future__ import annotations

import torch

from internvl.archs import LLM_ARCHS
from internvl.data.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.model.internvl_chat import InternVLChatModel
from internvl.tiny import tiny_config

ARCHITECTURES = sorted(LLM_ARCHS)


def build_model(arch: str = "Qwen2ForCausalLM", vision_style: str = "300M", seed: int = 0, **overrides):
    """A seeded tiny fp32 InternVLChatModel in eval mode."""
    torch.manual_seed(seed)
    return InternVLChatModel(tiny_config(arch, vision_style, **overrides)).eval()


def build_batch(model: InternVLChatModel, tokenizer, tiles: int = 2, seed: int = 0) -> dict:
    """One image sample: tiles of random pixels, a prompt with the image block, labels on the answer only."""
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    image = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (model.num_image_token * tiles) + IMG_END_TOKEN
    prompt = tokenizer(image + "\nWhat colour is the shape?", return_tensors="pt").input_ids
    answer = tokenizer(" The shape is red.<|im_end|>", return_tensors="pt").input_ids
    input_ids = torch.cat([prompt, answer], dim=1)
    labels = torch.cat([torch.full_like(prompt, -100), answer], dim=1)
    size = model.config.image_size
    generator = torch.Generator().manual_seed(seed)
    return dict(
        pixel_values=torch.randn(tiles, 3, size, size, generator=generator),
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        image_flags=torch.ones(tiles, dtype=torch.long),
        labels=labels,
    )
