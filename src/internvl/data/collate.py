"""Batch tokenized samples for training: padded side by side, or packed into one row.

A sample is {"input_ids": [T], "labels": [T], "attention_mask": [T] (optional), "pixel_values": [tiles, 3, H, W]
(absent or None for text-only samples), "image_flags": [tiles] (optional, default all 1)}.

`loss_reduction` ("token", "sample" or "square", the official `--loss_reduction`) other than "token" adds
`loss_weight` [B, T]: every supervised token of a sample with n supervised tokens weighs 1 (token), 1/n (sample) or
1/sqrt(n) (square), as the official `len2weight`; the model's loss is then sum(w * ce) / sum(w). The weights are
the same whether a sample is padded or packed, so packing never changes what is optimised.

The tiles of all samples are concatenated into one `pixel_values` batch, as the official model expects. A
text-only sample contributes one all-zero tile with image flag 0, as in the official trainer: the vision encoder
then runs on every rank in every step (distributed training hangs if one rank skips it), and the model drops the
features of flag-0 tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from internvl.data.constants import IGNORE_INDEX

Sample = dict[str, torch.Tensor]


LOSS_REDUCTIONS = ("token", "sample", "square")


def supervised_weights(labels: torch.Tensor, loss_reduction: str) -> torch.Tensor:
    """One sample's per-token loss weights [T] (float32): the official `len2weight` of its n trained targets
    (labels after the first that are not IGNORE_INDEX) where a label is trained, 0 elsewhere."""
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}; got {loss_reduction!r}")
    trained = labels != IGNORE_INDEX
    trained[:1] = False  # the first label is never a next-token target
    n = int(trained.sum())
    weight = {"token": 1.0, "sample": 1.0 / max(n, 1), "square": 1.0 / max(n, 1) ** 0.5}[loss_reduction]
    return trained.float() * weight


@dataclass(frozen=True)
class Collator:
    """The data collator for the trainer: `pad_batch` by default, `pack_batch` with pack=True.

    With pack=True an item of the batch may be a pack (a list of samples, as `internvl.data.packing` yields);
    `strict_tokens` / `strict_tiles` (the official `--strict_mode`) pad each pack to that many tokens and tiles.
    """

    pad_token_id: int | None = None  # the tokenizer's pad_token_id; not needed when packing
    pack: bool = False
    image_size: int = 448  # side of the dummy tile when no sample in the batch has an image
    loss_reduction: str = "token"
    strict_tokens: int | None = None
    strict_tiles: int | None = None

    def __post_init__(self):
        if not self.pack and self.pad_token_id is None:
            raise ValueError("padding needs pad_token_id (the tokenizer's pad_token_id)")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}")

    def __call__(self, items: Sequence[Sample | list[Sample]]) -> dict[str, torch.Tensor]:
        if self.pack:
            packs = [item if isinstance(item, list) else [item] for item in items]
            if self.strict_tokens or self.strict_tiles:
                packs = [pad_pack(pack, self.strict_tokens, self.strict_tiles, self.image_size) for pack in packs]
            return pack_batch([sample for pack in packs for sample in pack], self.image_size, self.loss_reduction)
        return pad_batch(items, self.pad_token_id, self.image_size, self.loss_reduction)


def pad_pack(pack: list[Sample], tokens: int | None, tiles: int | None, image_size: int) -> list[Sample]:
    """The pack with one filler sample appended (no labels, zero tiles with flag 0) up to `tokens` and `tiles`."""
    length = sum(len(sample["input_ids"]) for sample in pack)
    count = sum(sample_tiles(sample) for sample in pack)
    missing_tokens = max(0, (tokens or 0) - length)
    missing_tiles = max(0, (tiles or 0) - count)
    if not missing_tokens and not missing_tiles:
        return pack
    shape = next((s["pixel_values"].shape[1:] for s in pack if s.get("pixel_values") is not None),
                 (3, image_size, image_size))
    filler = {
        "input_ids": torch.zeros(missing_tokens, dtype=torch.long),
        "labels": torch.full((missing_tokens,), IGNORE_INDEX, dtype=torch.long),
        "pixel_values": torch.zeros(missing_tiles, *shape),  # possibly none: then it adds no tile
        "image_flags": torch.zeros(missing_tiles, dtype=torch.long),
    }
    return [*pack, filler]


def sample_tiles(sample: Sample) -> int:
    """Tiles a sample sends through the ViT (a text-only sample's blank tile counts: the ViT runs on it too)."""
    pixel_values = sample.get("pixel_values")
    return 1 if pixel_values is None else len(pixel_values)


def pad_batch(samples: Sequence[Sample], pad_token_id: int, image_size: int = 448,
              loss_reduction: str = "token") -> dict[str, torch.Tensor]:
    """Right-pad the samples to the longest: input_ids with pad_token_id, labels with IGNORE_INDEX, mask with 0.

    Returns input_ids, labels, attention_mask, position_ids ([B, T] each), pixel_values [N, 3, H, W] and
    image_flags [N] (N: all tiles of the batch); and loss_weight [B, T] unless loss_reduction is "token".
    """
    lengths = [len(sample["input_ids"]) for sample in samples]
    batch, longest = len(samples), max(lengths)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        input_ids[row, :length] = sample["input_ids"]
        labels[row, :length] = sample["labels"]
        attention_mask[row, :length] = sample.get("attention_mask", 1)
    pixel_values, image_flags = _concat_tiles(samples, image_size)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(longest).expand(batch, longest).clone(),
        "pixel_values": pixel_values,
        "image_flags": image_flags,
    }
    if loss_reduction != "token":
        batch["loss_weight"] = torch.stack([
            torch.cat([supervised_weights(s["labels"], loss_reduction), torch.zeros(longest - length)])
            for s, length in zip(samples, lengths)])
    return batch


def pack_batch(samples: Sequence[Sample], image_size: int = 448, loss_reduction: str = "token",
               ) -> dict[str, torch.Tensor]:
    """Concatenate the samples into one row, for variable-length attention.

    Returns input_ids, labels, position_ids ([1, sum T] each; positions restart at 0 for each sample), cu_seqlens
    (int32 [samples + 1], the sample boundaries), pixel_values and image_flags (and loss_weight [1, sum T] unless
    loss_reduction is "token"). There is no attention_mask: the model keeps samples apart with cu_seqlens (or
    the position restarts); a plain causal mask would let them attend to each other. Each sample's first label
    is IGNORE_INDEX, so the next-token loss never asks the last token of one sample to predict the first token
    of the next.
    """
    labels = []
    for sample in samples:
        sample_labels = sample["labels"].clone()
        sample_labels[:1] = IGNORE_INDEX
        labels.append(sample_labels)
    lengths = torch.tensor([len(sample["input_ids"]) for sample in samples])
    pixel_values, image_flags = _concat_tiles(samples, image_size)
    batch = {
        "input_ids": torch.cat([sample["input_ids"] for sample in samples])[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat([torch.arange(length) for length in lengths.tolist()])[None],
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)]),
        "pixel_values": pixel_values,
        "image_flags": image_flags,
    }
    if loss_reduction != "token":
        batch["loss_weight"] = torch.cat([supervised_weights(s["labels"], loss_reduction) for s in samples])[None]
    return batch


def _concat_tiles(samples: Sequence[Sample], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All tiles of the batch [N, 3, H, W] and their flags [N]; text-only samples add one zero tile, flag 0."""
    with_images = [sample["pixel_values"] for sample in samples if sample.get("pixel_values") is not None]
    if with_images:  # the dummy tile takes the shape and dtype of the real ones
        dummy = with_images[0].new_zeros(1, *with_images[0].shape[1:])
    else:
        dummy = torch.zeros(1, 3, image_size, image_size)
    tiles, flags = [], []
    for sample in samples:
        pixel_values = sample.get("pixel_values")
        if pixel_values is None:
            tiles.append(dummy)
            flags.append(torch.zeros(1, dtype=torch.long))
        else:
            tiles.append(pixel_values)
            sample_flags = sample.get("image_flags")
            flags.append(torch.ones(len(pixel_values), dtype=torch.long) if sample_flags is None else sample_flags)
    return torch.cat(tiles), torch.cat(flags).long()
