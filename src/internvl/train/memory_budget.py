"""The checkpoint plan of a fine-tune run, fitted on the GPU to the run's worst batch and a memory budget.

The fused path can keep some layers' activations (or all but their MLP's gate and up outputs) instead of
checkpointing every layer, which is faster and costs memory (`internvl.train.checkpointing`). How much memory a
run may spend is the budget: by default what HF + PEFT with every layer checkpointed needs for the same batch,
measured here on that batch, or `--memory_budget_gib`. The worst batch is the largest the run's settings allow:
`per_device_train_batch_size` rows of `max_seq_length` tokens with a full tile budget each, or, packed, one row
of that many packs of `max_packed_tokens` tokens and `num_images_expected` tiles.

The probe steps take gradients with `torch.autograd.grad`, which leaves every parameter's `.grad` (and so the
hooks DDP and DeepSpeed put on gradient accumulation) untouched, and they draw no random numbers of the run's.
What they do not see is the engine's own memory: gradients in `.grad`, the optimizer's states, and buffers such as
DeepSpeed ZeRO-1/2's reduce buckets (2 x `reduce_bucket_size` elements with `overlap_comm`, capped at the trainable
weights by `internvl.train.deepspeed_config.fit_reduce_buckets`). `EngineShare` measures it on the run's first step,
and the budget is what the whole step may use, the engine's share included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from internvl.data.constants import IMG_CONTEXT_TOKEN
from internvl.train.checkpointing import CheckpointPlan, checkpointable_layers, fit_checkpointing, peak_memory

GIB = 2**30


@dataclass(frozen=True)
class BatchShape:
    """The largest batch of a run: `rows` rows of `tokens` tokens, `tiles` image tiles per row; packed: one row."""

    rows: int
    tokens: int
    tiles: int
    packed: bool = False

    def __str__(self) -> str:
        if self.packed:
            return f"1 packed row of {self.tokens:,} tokens and {self.tiles} tiles"
        return f"{self.rows} row{'s' if self.rows != 1 else ''} of {self.tokens:,} tokens and {self.tiles} tiles each"


def worst_case_batch(model: nn.Module, tokenizer, shape: BatchShape, device) -> dict[str, torch.Tensor]:
    """A batch of `shape` for `model` (an InternVLChatModel): random text tokens, every label trained, the tiles'
    context tokens at the start of each row (as many as fit)."""
    generator = torch.Generator().manual_seed(0)
    size = model.config.force_image_size or model.config.vision_config.image_size
    tiles = min(shape.tiles, shape.tokens // model.num_image_token)
    rows = 1 if shape.packed else shape.rows
    input_ids = torch.randint(len(tokenizer) // 2, (rows, shape.tokens), generator=generator)
    input_ids[:, : tiles * model.num_image_token] = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    batch = {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "position_ids": torch.arange(shape.tokens).expand(rows, -1).clone(),
        "pixel_values": torch.zeros(rows * tiles, 3, size, size, dtype=model.dtype),
        "image_flags": torch.ones(rows * tiles, dtype=torch.long),
    }
    if shape.packed:
        batch["cu_seqlens"] = torch.tensor([0, shape.tokens], dtype=torch.int32)
    return {name: value.to(device) for name, value in batch.items()}


def probe_step(model: nn.Module, batch: dict[str, torch.Tensor]):
    """One forward and backward of `batch` whose gradients go nowhere (see the module)."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    devices = [batch["input_ids"].device] if batch["input_ids"].is_cuda else []

    def step():
        with torch.random.fork_rng(devices=devices):  # dropout's draws: the run's own stream stays untouched
            torch.autograd.grad(model(**batch).loss, trainable, allow_unused=True)

    return step


@dataclass
class EngineShare:
    """The memory a real training step takes beyond a probe step of the same batch, in bytes: `transient` only
    while the step runs (`.grad`, the engine's reduce buckets), `persistent` allocated by the first step and kept
    (the optimizer's states)."""

    transient: int
    persistent: int

    def __str__(self) -> str:
        return (f"the engine takes {self.transient / GIB:.2f} GiB during a step and {self.persistent / GIB:.2f} GiB "
                "for the optimizer")


class FirstStepMeasure:
    """Measures the `EngineShare` on a run's first step: `run(model, batch, real_step)` runs a probe step of the
    batch and then `real_step()` (the Trainer's); `share()`, once the optimizer has stepped, gives the share."""

    def __init__(self):
        self.transient: int | None = None
        self.allocated_before = 0

    def run(self, model: nn.Module, batch: dict[str, torch.Tensor], real_step):
        """`real_step()`'s result; its peak is compared with a probe step's of the same batch."""
        probe = peak_memory(probe_step(model, batch))
        self.allocated_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = real_step()
        torch.cuda.synchronize()
        self.transient = max(0, torch.cuda.max_memory_allocated() - probe)
        return result

    def share(self) -> EngineShare:
        """The share, measured by `run` and now, after the optimizer's first step."""
        return EngineShare(self.transient, max(0, torch.cuda.memory_allocated() - self.allocated_before))


def fit_plan(model: nn.Module, llm: nn.Module, batch: dict[str, torch.Tensor], budget_bytes: int) -> CheckpointPlan:
    """The plan of `llm`'s layers that fits `batch`'s step of `model` in `budget_bytes`, applied."""
    return fit_checkpointing(llm, probe_step(model, batch), budget_bytes)


def peft_budget(model: nn.Module, llm: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Peak bytes of `batch`'s step with every layer of `llm` checkpointed, before the fused path is swapped in."""
    layers = checkpointable_layers(llm)
    saved = [layer.gradient_checkpointing for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = True
    try:
        return peak_memory(probe_step(model, batch))
    finally:
        for layer, flag in zip(layers, saved):
            layer.gradient_checkpointing = flag
