"""Read the official training data from disk: the meta JSON, its JSONL annotation files and their images.

The meta JSON maps dataset names to `{root, annotation, data_augment, repeat_time, max_dynamic_patch?, length}`.
Each annotation line is one record: `{"image": "rel/path" | ["rel/path", ...] (absent: text only),
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`, its image
paths relative to `root`; a video line has `"video": "rel/path"` (a video file or a folder of frames) instead of
images, an optional `"clip": [start, end]` in seconds, and `<video>` where the frames go. Paths in the meta file
are used as written (relative ones from the working directory), as the official trainer does. A meta file must
name at least one dataset, each name once.

Annotation files are read lazily: one pass records where each line starts, and a record is read with one seek
when it is needed, so a file of millions of lines costs 16 bytes a line in memory. Blank lines are not records.
"""

from __future__ import annotations

import json
import os
import warnings
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from internvl.data.errors import (
    DECOMPRESSION_BOMB,
    EMPTY_DATASET,
    INVALID_RECORD,
    LENGTH_MISMATCH,
    MALFORMED_JSON,
    MISSING_IMAGE,
    NOT_UTF8,
    UNREADABLE_IMAGE,
    SampleError,
)

# Images with more pixels are refused before decoding: PIL's own default guard (about 0.25 GiB as RGB). Checked
# here rather than through PIL's global setting, which other code (the official trainer) may switch off.
MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of the meta JSON."""

    name: str
    root: str
    annotation: str
    data_augment: bool = False
    repeat_time: float = 1
    max_dynamic_patch: int | None = None  # overrides the trainer's max_dynamic_patch for this dataset
    length: object = None  # the record count the meta file claims: informative only, checked by validate-data


def read_meta(meta_path: str | os.PathLike) -> list[DatasetSpec]:
    """The datasets of a meta JSON, in file order; ValueError naming the file and entry when one is malformed.

    A name given twice is refused: plain JSON parsing would keep the last entry and drop the first without a word.
    """
    with open(meta_path, encoding="utf-8") as f:
        try:
            meta = json.load(f, object_pairs_hook=_refuse_repeated_keys)
        except json.JSONDecodeError as error:
            raise ValueError(f"{meta_path}: not valid JSON: {error}") from None
        except ValueError as error:  # a name given twice, or bytes that are not UTF-8
            raise ValueError(f"{meta_path}: {error}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object mapping dataset names to entries")
    if not meta:
        raise ValueError(f"{meta_path}: names no datasets")
    specs = []
    for name, entry in meta.items():
        where = f"{meta_path}: dataset {name!r}"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in ("root", "annotation")):
            raise ValueError(f"{where}: needs string fields 'root' and 'annotation'")
        repeat_time = entry.get("repeat_time", 1)
        if not isinstance(repeat_time, (int, float)) or repeat_time <= 0:
            raise ValueError(f"{where}: repeat_time must be a positive number, got {repeat_time!r}")
        if repeat_time > 1 and repeat_time != int(repeat_time):
            # The official trainer asserts this too: above 1 the lines are repeated a whole number of times.
            raise ValueError(f"{where}: repeat_time above 1 must be a whole number, got {repeat_time!r}")
        max_dynamic_patch = entry.get("max_dynamic_patch")
        if max_dynamic_patch is not None and (not isinstance(max_dynamic_patch, int) or max_dynamic_patch < 1):
            raise ValueError(f"{where}: max_dynamic_patch must be a positive integer, got {max_dynamic_patch!r}")
        specs.append(
            DatasetSpec(
                name=name,
                root=entry["root"],
                annotation=entry["annotation"],
                data_augment=bool(entry.get("data_augment", False)),
                repeat_time=repeat_time,
                max_dynamic_patch=max_dynamic_patch,
                length=entry.get("length"),
            )
        )
    return specs


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: the object as a dict; ValueError for a key it holds twice."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"{key!r} appears twice in one object; JSON would keep only the last")
        seen.add(key)
    return dict(pairs)


def iter_lines(
    path: str, start: int = 0, stop: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw bytes) of each non-blank line starting in [start, stop) of a file.

    `start` must be the offset of a line's beginning and `first_line` that line's number (1-based).
    """
    with open(path, "rb") as f:
        f.seek(start)
        offset, number = start, first_line
        for raw in f:
            if stop is not None and offset >= stop:
                break
            if not raw.isspace():
                yield number, offset, raw
            offset += len(raw)
            number += 1


class LineIndex:
    """Where each non-blank line of a text file starts, so that any line can be read later with one seek."""

    def __init__(self, path: str):
        self.path = path
        self.offsets = array("q")  # byte offset of each indexed line
        self.line_numbers = array("q")  # its 1-based line number in the file
        for number, offset, _ in iter_lines(path):
            self.offsets.append(offset)
            self.line_numbers.append(number)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> bytes:
        """The raw bytes of the i-th indexed line."""
        # Opened per read: a file object shared with forked DataLoader workers would share its position too.
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            return f.readline()


@dataclass(frozen=True)
class Record:
    """One annotation line, parsed: where it is, its images or video (paths joined to the root) and its
    conversation."""

    file: str
    line: int
    images: tuple[str, ...]
    conversations: list[dict[str, str]]
    video: str | None = None
    clip: tuple[float, float] | None = None  # the part of the video to use, in seconds


def parse_record(raw: bytes, file: str, line: int, root: str) -> Record:
    """Decode and check one annotation line; SampleError at `file:line` when it is not a usable record."""
    try:
        data = json.loads(raw.decode("utf-8").rstrip("\r\n"))  # without the newline, error columns are on line 1
    except UnicodeDecodeError as error:
        raise SampleError(NOT_UTF8, f"byte 0x{raw[error.start]:02x} at column {error.start + 1}", file, line) from None
    except json.JSONDecodeError as error:
        raise SampleError(MALFORMED_JSON, f"{error.msg} at column {error.colno}", file, line) from None
    if not isinstance(data, dict):
        raise SampleError(INVALID_RECORD, f"expected a JSON object, got {type(data).__name__}", file, line)
    conversations = data.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(INVALID_RECORD, "'conversations' must be a non-empty list", file, line)
    for i, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise SampleError(INVALID_RECORD, f"conversations[{i}] needs string 'from' and 'value'", file, line)
    image = data.get("image") or ()  # absent, null, "" and [] all mean a text-only sample, as officially
    paths = (image,) if isinstance(image, str) else image
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) and p for p in paths):
        raise SampleError(INVALID_RECORD, "'image' must be a path or a list of paths", file, line)
    video = data.get("video") or None  # absent, null and "" mean no video, as officially
    if video is not None and (not isinstance(video, str) or paths):
        # Officially a line with both is read as an image line: its video would be dropped without a word.
        raise SampleError(INVALID_RECORD, "'video' must be one path, on a line without 'image'", file, line)
    clip = data.get("clip")
    if clip is not None and not (video is not None and _is_clip(clip)):
        raise SampleError(INVALID_RECORD, "'clip' must be [start, end] in seconds, 0 <= start < end, beside a "
                                          "'video'", file, line)
    return Record(file, line, tuple(os.path.join(root, p) for p in paths), conversations,
                  None if video is None else os.path.join(root, video), None if clip is None else tuple(clip))


def _is_clip(clip: object) -> bool:
    """Whether a record's "clip" is [start, end] seconds of a video."""
    return (isinstance(clip, list) and len(clip) == 2
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in clip) and 0 <= clip[0] < clip[1])


class Annotations:
    """The records one meta entry contributes: its JSONL lines, cut or repeated by `repeat_time`.

    As officially: repeat_time < 1 keeps the first int(lines * repeat_time) lines (no shuffle), a whole
    repeat_time > 1 repeats all lines that many times (index i reads line i % lines).
    """

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.index = LineIndex(spec.annotation)
        self.distinct = int(len(self.index) * min(spec.repeat_time, 1))  # how many lines are used
        self.repeats = max(int(spec.repeat_time), 1)

    def __len__(self) -> int:
        return self.distinct * self.repeats

    def problems(self, meta_path: str | os.PathLike) -> list[SampleError]:
        """What is wrong with the entry as a whole, located at the meta file: it gives no sample (no records, or a
        repeat_time that keeps none of them), or its `length` is not the record count."""
        spec, records, meta_path = self.spec, len(self.index), os.fspath(meta_path)
        where = f"{spec.name!r} ({spec.annotation})"
        found = []
        if records == 0:
            found.append(SampleError(EMPTY_DATASET, f"{where} has no records", meta_path))
        elif self.distinct == 0:
            detail = f"{where}: repeat_time {spec.repeat_time} keeps none of its {records} record(s)"
            found.append(SampleError(EMPTY_DATASET, detail, meta_path))
        if spec.length is not None and (type(spec.length) is not int or spec.length != records):
            detail = f"{where} has {records} record(s), but its length says {spec.length!r}"
            found.append(SampleError(LENGTH_MISMATCH, detail, meta_path))
        return found

    def record(self, i: int) -> Record:
        """The i-th record (0 <= i < len); SampleError at its file and line when it is malformed."""
        line = i % self.distinct
        return parse_record(
            self.index.read(line), self.spec.annotation, self.index.line_numbers[line], self.spec.root
        )


def open_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file fully, as RGB; SampleError (no location) when it is missing, unreadable or a bomb.

    The pixel count is checked from the header before anything is decoded, so a decompression bomb costs no
    memory; truncated files fail (PIL's LOAD_TRUNCATED_IMAGES, which the official trainer sets, is not used).
    """
    if not os.path.isfile(path):
        raise SampleError(MISSING_IMAGE, path)
    try:
        with warnings.catch_warnings():
            # PIL warns above its limit and raises above twice the limit; both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise SampleError(DECOMPRESSION_BOMB, f"{path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise many exception types on corrupt files
        raise SampleError(UNREADABLE_IMAGE, f"{path}: {error}") from None
    with image:
        if image.width * image.height > max_pixels:
            raise SampleError(
                DECOMPRESSION_BOMB, f"{path}: {image.width}x{image.height} pixels, more than {max_pixels}"
            )
        try:
            image.load()  # decode everything now, so that a truncated file fails here and not half-way
            return image.convert("RGB")
        except Exception as error:  # noqa: BLE001 - as above
            raise SampleError(UNREADABLE_IMAGE, f"{path}: {error}") from None
