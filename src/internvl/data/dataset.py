"""The training dataset: records of the meta file's JSONL files -> image tiles + input ids and labels.

It does what the official `LazySupervisedDataset` + `build_datasets` do; a `SampleBuilder` holds the settings and
turns one record into one sample:
- one image: `<image>` is put before the first human turn when the conversation has none; the image gets up to
  `max_dynamic_patch` tiles (a meta entry's own `max_dynamic_patch` wins);
- n images: each gets `max(1, max_dynamic_patch // n)` tiles and the conversation must hold n `<image>`;
- a video: `<video>` is put before the first human turn when missing; min_num_frame to max_num_frame frames are
  drawn (`internvl.data.video`), each one tile, and `<video>` becomes `Frame-1: <image>\nFrame-2: <image>...`;
- text only: one blank tile with image flag 0, which the model ignores;
- `data_augment` entries re-encode each tile as a JPEG of random quality 75-100 first.

The frames are drawn from a generator seeded by (seed, epoch, sample index): each epoch and each repeat of a line
draws anew, and a run, resumed or run again, draws the same (officially: numpy's global generator, unseeded per
worker). The JPEG quality comes from torch's seeded generator, as before.

Unlike the official dataset, which prints a warning and returns a random other sample, a bad sample raises a
SampleError naming its `FILE:LINE`. With `skip_bad_samples=True` it is logged, counted by cause and replaced by
the next good sample (index + 1, + 2, ...), so the same index always gives the same sample; when none is left,
a ValueError says so (one line: how many, per cause, the first). A sample over the length limit is truncated and
trained on, as officially, but logged once per line and counted too; one certainly over twice the limit is a bad
sample (`sample too long`), refused before it is tokenized.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from internvl.data.constants import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    MAX_NUM_FRAME,
    MIN_NUM_FRAME,
    VIDEO_PLACEHOLDER,
)
from internvl.data.errors import (
    CAUSES,
    EMPTY_DATASET,
    IMAGE_COUNT_MISMATCH,
    INVALID_CONVERSATION,
    SAMPLE_TOO_LONG,
    SAMPLE_TRUNCATED,
    TOKENIZATION_MISMATCH,
    SampleError,
)
from internvl.data.reading import Annotations, Record, open_image, read_meta
from internvl.data.templates import get_conv_template
from internvl.data.tiling import count_tiles, dynamic_preprocess, expand_to_square, tiles_per_image, tiles_to_tensor
from internvl.data.tokenize import (
    SampleTooLong,
    TokenizationMismatch,
    Truncation,
    longest_token_bytes,
    preprocess,
    text_bytes,
)
from internvl.data.video import Video, clip_frames, frame_placeholders, open_video, random_frame_indices

logger = logging.getLogger(__name__)

JPEG_QUALITIES = range(75, 101)  # the official data augmentation's choices


@dataclass(frozen=True)
class SampleBuilder:
    """How a record becomes a sample: tiling settings, conversation template, tokenizer and length limit."""

    tokenizer: PreTrainedTokenizerBase
    template_name: str
    num_image_token: int  # LLM tokens per tile
    image_size: int = 448
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    max_seq_length: int | None = None  # None: tokenizer.model_max_length
    normalize_type: str = "imagenet"  # the mean and std of the tiles (NORMALIZATIONS)
    pad2square: bool = False  # without tiling, pad each image to a square of the mean colour (not when augmenting)
    min_num_frame: int = MIN_NUM_FRAME  # fewest frames drawn from a video
    max_num_frame: int = MAX_NUM_FRAME  # most frames drawn from a video

    def __post_init__(self):
        get_conv_template(self.template_name)  # an unknown name is one settings error, not a bad sample per line
        if not 1 <= self.min_num_frame <= self.max_num_frame:
            raise ValueError(f"--min_num_frame {self.min_num_frame}, --max_num_frame {self.max_num_frame}: a video "
                             "needs 1 <= min_num_frame <= max_num_frame frames")
        for token in (IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN):
            if self.tokenizer.convert_tokens_to_ids(token) in (None, self.tokenizer.unk_token_id):
                raise ValueError(f"tokenizer has no {token} token; load it with internvl.data.tokenizer.load_tokenizer")

    @property
    def limit(self) -> int:
        """The most tokens a sample keeps."""
        return self.max_seq_length or self.tokenizer.model_max_length

    def build(self, record: Record, max_dynamic_patch: int | None = None, augment: bool = False,
              rng: np.random.Generator | None = None) -> dict:
        """The sample of a record: input_ids, labels, attention_mask [T]; pixel_values [tiles, 3, H, W]; image_flags;
        and "truncation" (a `Truncation`) when the length limit cut it.

        `max_dynamic_patch` (the meta entry's) replaces the builder's. `rng` draws a video's frames (default: a
        generator seeded by the record's line). Raises SampleError located at the record.
        """
        with _located(record):
            rng = np.random.default_rng(record.line) if rng is None else rng
            conversations, images, budget = self._read(record, max_dynamic_patch, rng)
            tiles = [self._tiles(image, budget, augment) for image in images]
            sample = self._tokenize(conversations, [len(image_tiles) for image_tiles in tiles])
        flat = [tile for image_tiles in tiles for tile in image_tiles]
        if augment:
            flat = [_jpeg_degrade(tile) for tile in flat]
        if flat:
            sample["pixel_values"] = tiles_to_tensor(flat, self.image_size, self.normalize_type)
            sample["image_flags"] = torch.ones(len(flat), dtype=torch.long)
        else:  # as officially: one tile the model drops (flag 0), so that every sample runs the vision encoder
            sample["pixel_values"] = torch.zeros(1, 3, self.image_size, self.image_size)
            sample["image_flags"] = torch.zeros(1, dtype=torch.long)
        return sample

    def check(self, record: Record, max_dynamic_patch: int | None = None) -> SampleError | None:
        """Everything `build` checks, without making pixels; raises the same located SampleError. Returns the
        problem that training lives with, located: the sample's truncation (None: it fits).

        A video is probed, not read: opened and indexed, and decoded only where its clip starts and ends (so its
        codec works and its end is there); its length is counted at max_num_frame frames, the most a draw gives.
        """
        with _located(record):
            if record.video is not None:
                video, frames = self._video(record)
                video.read([frames[0], frames[-1]])
                sample = self._tokenize(self._conversations(record, self.max_num_frame), [1] * self.max_num_frame)
            else:
                conversations, images, budget = self._read(record, max_dynamic_patch, None)
                sample = self._tokenize(conversations, [self._count_tiles(image, budget) for image in images])
        truncation = sample.get("truncation")
        return None if truncation is None else _truncation_problem(record, truncation)

    def _read(self, record: Record, max_dynamic_patch: int | None,
              rng: np.random.Generator | None) -> tuple[list, list[Image.Image], int | None]:
        """The conversation with its placeholders, the decoded images (a video's drawn frames) and each image's tile
        budget (None: one tile each, as video frames always are)."""
        if record.video is not None:
            count = int(rng.integers(self.min_num_frame, self.max_num_frame + 1))
            conversations = self._conversations(record, count)  # a wrong placeholder costs no decoding
            video, frames = self._video(record)
            return conversations, video.read(random_frame_indices(count, frames, rng)), None
        conversations = self._conversations(record)
        images = [open_image(path) for path in record.images]
        budget = tiles_per_image(max_dynamic_patch or self.max_dynamic_patch, max(len(images), 1))
        return conversations, images, budget

    @staticmethod
    def _video(record: Record) -> tuple[Video, range]:
        """The record's video, opened and indexed, and the frames its clip covers."""
        video = open_video(record.video)
        return video, clip_frames(video, record.clip)

    def _conversations(self, record: Record, frames: int = 0) -> list[dict[str, str]]:
        """The turns with one `<image>` per image, or per frame of a video (its `<video>` expanded into `frames`
        lines); a lone image's or a video's placeholder is added to the first human turn when missing."""
        conversations = [dict(turn) for turn in record.conversations]
        placeholder, wanted = (VIDEO_PLACEHOLDER, 1) if record.video else (IMAGE_PLACEHOLDER, len(record.images))
        placeholders = _count(conversations, placeholder)
        if wanted == 1 and placeholders == 0:
            first_human = next((turn for turn in conversations if turn["from"] == "human"), None)
            if first_human is not None:
                first_human["value"] = placeholder + "\n" + first_human["value"]
                placeholders = 1
        if record.video is None:
            if placeholders != wanted:
                detail = f"{wanted} image(s) but {placeholders} {IMAGE_PLACEHOLDER} placeholder(s)"
                raise SampleError(IMAGE_COUNT_MISMATCH, detail)
            return conversations
        stray = _count(conversations, IMAGE_PLACEHOLDER)
        if placeholders != 1 or stray:
            detail = (f"a video needs one {VIDEO_PLACEHOLDER} and no {IMAGE_PLACEHOLDER}; found {placeholders} and "
                      f"{stray}")
            raise SampleError(IMAGE_COUNT_MISMATCH, detail)
        for turn in conversations:
            turn["value"] = turn["value"].replace(VIDEO_PLACEHOLDER, frame_placeholders(frames))
        return conversations

    def _tiles(self, image: Image.Image, budget: int | None, augment: bool) -> list[Image.Image]:
        if budget is None or not self.dynamic_image_size:
            # Officially the padding is in the evaluation transform only, which data_augment datasets do not use.
            return [expand_to_square(image, self.normalize_type) if self.pad2square and not augment else image]
        return dynamic_preprocess(image, self.min_dynamic_patch, budget, self.image_size, self.use_thumbnail)

    def _count_tiles(self, image: Image.Image, budget: int) -> int:
        if not self.dynamic_image_size:
            return 1
        return count_tiles(image.width, image.height, self.min_dynamic_patch, budget, self.image_size,
                           self.use_thumbnail)

    @cached_property
    def _longest_token_bytes(self) -> int:
        return longest_token_bytes(self.tokenizer)

    def _tokenize(self, conversations: list[dict[str, str]], tile_counts: Sequence[int]) -> dict:
        """preprocess(), its errors turned into SampleErrors; a sample left with nothing to learn is one too, and so
        is one certainly over twice the limit (truncation would drop most of it), found without tokenizing it: a
        10 MB line takes seconds and GBs to tokenize.
        """
        # Each value as stripped: internlm2-chat strips them, and every template's prompt holds at least that much.
        size = sum(text_bytes(self.tokenizer, turn["value"].strip()) for turn in conversations)
        fewest = -(-size // self._longest_token_bytes)  # tokens, at least: see longest_token_bytes
        if fewest > 2 * self.limit:
            raise SampleError(
                SAMPLE_TOO_LONG,
                f"{size} bytes of text make at least {fewest} tokens (no token stands for more than "
                f"{self._longest_token_bytes} bytes), over twice the limit of {self.limit}: refused rather than "
                "truncated, which would drop most of it; shorten or split it",
            )
        try:
            sample = preprocess(
                self.template_name,
                conversations,
                self.tokenizer,
                [self.num_image_token * count for count in tile_counts],
                max_seq_length=self.max_seq_length,
            )
        except SampleTooLong as error:
            raise SampleError(SAMPLE_TOO_LONG, str(error)) from None
        except TokenizationMismatch as error:
            raise SampleError(TOKENIZATION_MISMATCH, str(error)) from None
        except ValueError as error:  # preprocess's other errors are all about the turns
            raise SampleError(INVALID_CONVERSATION, str(error)) from None
        if bool((sample["labels"] == IGNORE_INDEX).all()):
            raise SampleError(SAMPLE_TOO_LONG, f"no answer token within the first {self.limit} tokens")
        return sample


def _count(conversations: list[dict[str, str]], placeholder: str) -> int:
    return sum(turn["value"].count(placeholder) for turn in conversations)


def _truncation_problem(record: Record, truncation: Truncation) -> SampleError:
    """A sample's truncation as a problem at its record's FILE:LINE."""
    return SampleError(SAMPLE_TRUNCATED, str(truncation), record.file, record.line)


@contextmanager
def _located(record: Record) -> Iterator[None]:
    """Re-raise the SampleErrors of the block at the record's FILE:LINE."""
    try:
        yield
    except SampleError as error:
        raise error.located(record.file, record.line) from None


def _per_cause(counts: dict[str, int]) -> str:
    return ", ".join(f"{cause}: {count}" for cause, count in counts.items())


def _estimated_length(raw: bytes, image_tokens: int, video_tokens: int) -> int:
    """A record line's length in tokens for grouping: its `length` field, else about 4 bytes of text a token, plus
    the image or video tokens."""
    try:
        record = json.loads(raw)
    except ValueError:  # a bad line: it fails when built, its length matters little
        return len(raw) // 4
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return len(raw) // 4
    if isinstance(record.get("length"), int):
        return record["length"]
    text = sum(len(str(turn.get("value", "")).encode()) for turn in record["conversations"] if isinstance(turn, dict))
    return text // 4 + (image_tokens if record.get("image") else video_tokens if record.get("video") else 0)


def _jpeg_degrade(tile: Image.Image) -> Image.Image:
    """The official augmentation: the tile re-encoded as a JPEG of a random quality (torch's seeded generator)."""
    quality = JPEG_QUALITIES[int(torch.randint(len(JPEG_QUALITIES), ()))]
    buffer = io.BytesIO()
    tile.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as degraded:
        return degraded.convert("RGB")


class InternVLDataset(Dataset):
    """Every dataset of a meta JSON as one map-style dataset, in meta order; items are ready for the Collator."""

    def __init__(self, meta_path: str | os.PathLike, builder: SampleBuilder, skip_bad_samples: bool = False,
                 seed: int = 0):
        """Index the annotation files; a dataset that gives no sample is a ValueError, a wrong `length` a warning.
        `seed` seeds the draws of video frames, with the epoch (`set_epoch`) and the sample's index."""
        self.meta_path = meta_path
        self.builder = builder
        self.skip_bad_samples = skip_bad_samples
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # shared: DataLoader workers see it change
        self.parts = [Annotations(spec) for spec in read_meta(meta_path)]
        for part in self.parts:
            for problem in part.problems(meta_path):
                if problem.cause == EMPTY_DATASET:
                    raise problem
                logger.warning("%s", problem)
        self._ends = list(accumulate(len(part) for part in self.parts))  # global index ranges of the parts
        # Marks, one byte per distinct line, in shared memory so that marks made in DataLoader worker processes
        # reach skip_report() in the main process. _bad: 0 not known bad, k cause CAUSES[k - 1]; _truncated: 1 once
        # the line's truncation was logged.
        self._line_starts = [0, *accumulate(part.distinct for part in self.parts)]
        self._bad = torch.zeros(self._line_starts[-1], dtype=torch.uint8).share_memory_()
        self._truncated = torch.zeros(self._line_starts[-1], dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.get(index)

    def get(self, index: int, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """The sample of `index`, its random draws (video frames) those of `epoch` (default: `set_epoch`'s)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        if not self.skip_bad_samples:
            return self._build(index, epoch)
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            mark = self._mark_position(candidate)
            if self._bad[mark]:  # known bad (already logged and counted): no need to read it again
                continue
            try:
                return self._build(candidate, epoch)
            except SampleError as error:
                self._bad[mark] = CAUSES.index(error.cause) + 1
                logger.warning("skipping bad sample %s", error)
        raise self._nothing_to_train_on()

    def set_epoch(self, epoch: int) -> None:
        """Start drawing the frames of `epoch`, in this process and in DataLoader workers already started."""
        self._epoch.fill_(epoch)

    def skip_report(self) -> dict[str, int]:
        """Samples not trained on as written so far (distinct annotation lines), per cause: the bad ones skipped, and
        the truncated ones (`sample truncated`); also logged as warnings."""
        report = self._bad_lines()
        if report:
            logger.warning("skipped %d bad samples (%s)", sum(report.values()), _per_cause(report))
        elif self.skip_bad_samples:
            logger.info("no bad sample skipped")
        truncated_lines = int(self._truncated.sum())
        if truncated_lines:
            report[SAMPLE_TRUNCATED] = truncated_lines
            logger.warning("trained on %d samples truncated to %d tokens (each logged with its line)",
                           truncated_lines, self.builder.limit)
        return report

    def _bad_lines(self) -> dict[str, int]:
        """Bad annotation lines found so far, per cause."""
        counts = torch.bincount(self._bad.long(), minlength=len(CAUSES) + 1).tolist()
        return {cause: count for cause, count in zip(CAUSES, counts[1:]) if count}

    def _nothing_to_train_on(self) -> ValueError:
        """The error when skipping found every line bad: a user's error (one line), not a crash."""
        first = self.parts[0]
        where = f"{first.spec.annotation}:{first.index.line_numbers[0]}: {CAUSES[int(self._bad[0]) - 1]}"
        return ValueError(f"{self.meta_path}: nothing to train on: all {len(self._bad)} annotation lines are bad "
                          f"({_per_cause(self._bad_lines())}); the first: {where}")

    def lengths(self) -> list[int]:
        """Each sample's length in tokens, estimated for length-grouped batches (--group_by_length) without building
        any sample: a record's own `length` field where it has one (as officially), else its text's UTF-8 bytes / 4
        plus, when it has images, the image tokens of a full tile budget, for a video those of max_num_frame frames.
        Reads every line once."""
        builder = self.builder
        image_tokens = builder.num_image_token * (builder.max_dynamic_patch + int(builder.use_thumbnail))
        video_tokens = builder.num_image_token * builder.max_num_frame
        lengths = []
        for part in self.parts:
            distinct = [_estimated_length(part.index.read(line), image_tokens, video_tokens)
                        for line in range(part.distinct)]
            lengths += distinct * part.repeats
        return lengths

    def _locate(self, index: int) -> tuple[int, int]:
        """(part, index within the part) of a global index."""
        part = bisect.bisect_right(self._ends, index)
        return part, index - (self._ends[part - 1] if part else 0)

    def _mark_position(self, index: int) -> int:
        """Where the bad-sample mark of a global index is: its line's, shared by the line's repeats."""
        part, local = self._locate(index)
        return self._line_starts[part] + local % self.parts[part].distinct

    def _build(self, index: int, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """The sample of a global index; its truncation, if any, logged the first time its line is read."""
        part, local = self._locate(index)
        annotations = self.parts[part]
        spec = annotations.spec
        record = annotations.record(local)
        rng = np.random.default_rng([self.seed, int(self._epoch) if epoch is None else epoch, index])
        sample = self.builder.build(record, spec.max_dynamic_patch, augment=spec.data_augment, rng=rng)
        truncation = sample.pop("truncation", None)
        mark = self._mark_position(index)
        if truncation is not None and not self._truncated[mark]:
            self._truncated[mark] = 1
            logger.warning("%s; trained on its first %d tokens, as the official trainer does",
                           _truncation_problem(record, truncation), truncation.limit)
        return sample
