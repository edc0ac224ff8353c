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


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero LoRA A and B (PEFT starts B at zero, which would hide half of the gradients)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradient of every trainable parameter, by name."""
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def tiny_peft_llm(arch: str, dropout: float = 0.0, seed: int = 0, targets=None, **peft_options):
    """The tiny LLM of `arch` (as in the tiny chat models) wrapped in PEFT LoRA on `targets` (default: the table's),
    random non-zero adapters, in training mode."""
    from peft import LoraConfig, get_peft_model

    from internvl.archs import llm_arch, resolve

    row = llm_arch(arch)
    torch.manual_seed(seed)
    llm = resolve(row.model_class)(tiny_config(arch).llm_config)
    parameters = list(row.lora_target_parameters) if targets is None else []
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets or row.lora_targets),
                        target_parameters=parameters or None, task_type="CAUSAL_LM", **peft_options)
    model = get_peft_model(llm, config)
    randomize_lora(model, seed)
    model.enable_input_require_grads()
    return model.train()


def token_batch(vocab: int = 600, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of two random rows, the first with a masked prompt as in chat data."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (2, length), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100
    return input_ids, labels
