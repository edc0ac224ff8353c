"""Videos: open a video file or a folder of frame images, draw which frames to use, and read those frames.

The official InternVL video rules, for training (`video_get_item` and its readers) and for chat (the model cards'
`load_video`):
- training draws a frame count uniformly from [min_num_frame, max_num_frame] (officially 8 and 32), cuts the
  video (or its clip, `[start, end]` in seconds: frames int(start * fps) on, int((end - start) * fps) of them)
  into that many near-equal intervals and draws one frame in each (`random_frame_indices`); a video with fewer
  frames gives each frame once, then its last frame again up to the count;
- chat takes the middle frame of each of `num_segments` equal segments (`middle_frame_indices`);
- every frame is one tile; training prompts name them `Frame-1: <image>` ..., the model cards `Frame1: <image>`.

Any file FFmpeg reads (MP4/H.264, WebM/VP9, GIF, ...) is read through PyAV, FFmpeg's maintained bindings, whose
wheels carry FFmpeg (decord, the official reader, has had no release since 2021). Opening one indexes it from one
pass over its packets, with no decoding; reading then decodes only from the keyframe before each wanted frame.
A folder is a video of its image files in natural order (`frame_2.jpg` before `frame_10.jpg`).

Where this differs from the official code, on purpose: a frame is drawn from its whole interval (officially never
its last frame, and a random permutation replaces the rule when an interval is one frame long); GIFs and folders
are padded to the drawn count like video files (officially they give each frame once); a clip applies to a GIF
too, and one on a frame folder is refused (officially both ignore it); frame files sort naturally (officially by
the number after `_` in `*_N.jpg` names, else in directory order).
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import av
import numpy as np
import torch
from PIL import Image

from internvl.data.errors import (
    CLIP_OUTSIDE_VIDEO,
    DECOMPRESSION_BOMB,
    INVALID_RECORD,
    MISSING_VIDEO,
    UNREADABLE_VIDEO,
    SampleError,
)
from internvl.data.reading import MAX_IMAGE_PIXELS, open_image
from internvl.data.tiling import dynamic_preprocess, tiles_to_tensor

# PyAV 17 and newer scale frames on a pool of FFmpeg threads. A DataLoader worker forked after its parent scaled a
# frame inherits that pool without its threads and waits on it forever: one thread, no pool.
ONE_SCALING_THREAD = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


class VideoFile:
    """A video file, indexed: its frames' timestamps in presentation order, and its keyframes'.

    SampleError (no location) when it cannot be opened, has no video stream or frame, holds fewer frames than its
    header declares (truncated), or has frames over `max_pixels` (as for images: decoding 32 of them would take GBs).
    """

    def __init__(self, path: str, max_pixels: int = MAX_IMAGE_PIXELS):
        self.path = path
        with _reading(path) as container:
            if not container.streams.video:
                raise SampleError(UNREADABLE_VIDEO, f"{path}: no video stream (not a video, or cut short)")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise SampleError(DECOMPRESSION_BOMB,
                                  f"{path}: {width}x{height} pixels a frame, more than {max_pixels}")
            rate = stream.average_rate or stream.guessed_rate
            self.fps: float | None = float(rate) if rate else None
            timestamps, keyframes, packets = [], [], 0
            for packet in container.demux(stream):  # each packet's data is dropped at once: a video can be GBs
                if not packet.size:  # the last one only flushes the decoder
                    continue
                packets += 1
                # A discarded packet (before an MP4 edit list's start) is decoded but never shown: not a frame.
                if packet.pts is not None and not packet.is_discard:
                    timestamps.append(packet.pts)
                    if packet.is_keyframe:
                        keyframes.append(packet.pts)
            declared = stream.frames  # 0 where the container does not say (WebM, GIF)
        if not timestamps:
            raise SampleError(UNREADABLE_VIDEO, f"{path}: no frame")
        if declared > packets:
            raise SampleError(UNREADABLE_VIDEO, f"{path}: truncated: its header declares {declared} frames, the file "
                                                f"holds {packets}")
        self.timestamps, self.keyframes = sorted(timestamps), sorted(keyframes)

    @property
    def frame_count(self) -> int:
        return len(self.timestamps)

    def read(self, indices: Sequence[int]) -> list[Image.Image]:
        """The frames at `indices` (any order, repeats allowed) as RGB images; SampleError when one does not decode.

        Wanted frames are taken in order; the decoder seeks to the keyframe before a frame only when it is not
        already decoding that keyframe's group, so frames between two wanted groups are never decoded.
        """
        frames = {}
        with _reading(self.path) as container:
            stream = container.streams.video[0]
            decoded, group = None, None
            for index in sorted(set(indices)):
                timestamp = self.timestamps[index]
                position = bisect.bisect_right(self.keyframes, timestamp) - 1
                keyframe = self.keyframes[position] if position >= 0 else None  # None: decode from the start
                if decoded is None or keyframe != group:
                    if keyframe is not None:
                        container.seek(keyframe, stream=stream)
                    decoded, group = container.decode(stream), keyframe
                frames[index] = self._decode_until(decoded, timestamp, index)
        return [frames[index] for index in indices]

    def _decode_until(self, decoded, timestamp: int, index: int) -> Image.Image:
        """Decode on to the frame shown at `timestamp`."""
        for frame in decoded:
            if frame.pts is None or frame.pts < timestamp:
                continue
            if frame.pts == timestamp:
                return frame.to_image(**ONE_SCALING_THREAD)
            break
        # The decoder dropped it: H.264 decoders skip frames they cannot decode rather than fail.
        raise SampleError(UNREADABLE_VIDEO, f"{self.path}: frame {index} does not decode")


class FrameFolder:
    """A folder of frame images, in natural order of their names (hidden and non-image files left out)."""

    fps = None  # a folder has no timestamps

    def __init__(self, path: str):
        self.path = path
        names = [name for name in os.listdir(path) if not name.startswith(".")
                 and os.path.splitext(name)[1].lower() in _image_extensions()
                 and os.path.isfile(os.path.join(path, name))]
        if not names:
            raise SampleError(UNREADABLE_VIDEO, f"{path}: a frame folder without image files")
        self.files = [os.path.join(path, name) for name in sorted(names, key=_natural_key)]

    @property
    def frame_count(self) -> int:
        return len(self.files)

    def read(self, indices: Sequence[int]) -> list[Image.Image]:
        """The frames at `indices` as RGB images; only those files are decoded."""
        frames = {index: open_image(self.files[index]) for index in set(indices)}
        return [frames[index] for index in indices]


Video = VideoFile | FrameFolder


def open_video(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Video:
    """The video at `path`: a folder of frames, or a video file; SampleError (no location) when it is missing or
    unreadable. Only a regular file is opened (a FIFO or a device named .mp4 would block or never end)."""
    if os.path.isdir(path):
        return FrameFolder(path)
    if not os.path.isfile(path):
        raise SampleError(MISSING_VIDEO, path)
    return VideoFile(path, max_pixels)


def clip_frames(video: Video, clip: tuple[float, float] | None) -> range:
    """The frames a clip covers (all of them without a clip), by the official rule; SampleError when the clip
    needs frames the video does not have, or covers none."""
    if clip is None:
        return range(video.frame_count)
    if video.fps is None:
        raise SampleError(INVALID_RECORD, f"'clip' needs timestamps, which the frame folder {video.path} has not")
    start, end = clip
    first, count = int(start * video.fps), int((end - start) * video.fps)
    if count < 1 or first + count > video.frame_count:
        seconds = video.frame_count / video.fps
        raise SampleError(CLIP_OUTSIDE_VIDEO, f"[{start:g}, {end:g}] s of {video.path}, which has {video.frame_count} "
                                              f"frames at {video.fps:g} fps ({seconds:g} s)")
    return range(first, first + count)


def random_frame_indices(count: int, frames: range, rng: np.random.Generator) -> list[int]:
    """`count` frame indices drawn from `frames` by the official training rule ('rand'): `frames` cut into
    min(count, len(frames)) near-equal intervals, one frame drawn uniformly in each; the last index repeated up to
    `count` when there are fewer frames."""
    intervals = min(count, len(frames))
    bounds = np.linspace(0, len(frames), intervals + 1).astype(int)  # intervals of at least one frame each
    drawn = (frames.start + rng.integers(bounds[:-1], bounds[1:])).tolist()
    return drawn + drawn[-1:] * (count - intervals)


def middle_frame_indices(frame_count: int, fps: float | None, segments: int,
                         bound: tuple[float, float] | None = None) -> list[int]:
    """The model cards' `get_index`: the frames (of the `bound` seconds, else all) cut into `segments` equal
    segments, the middle frame of each."""
    if bound is None:
        first, last = 0, frame_count - 1
    elif fps is None:
        raise ValueError("a bound in seconds needs timestamps, which a frame folder has not")
    else:
        first, last = max(0, round(bound[0] * fps)), min(round(bound[1] * fps), frame_count - 1)
    size = (last - first) / segments
    return [int(first + size / 2 + round(size * i)) for i in range(segments)]


def frame_placeholders(count: int) -> str:
    """What a training prompt's `<video>` becomes: one `Frame-i: <image>` line per frame."""
    return "\n".join(f"Frame-{i}: <image>" for i in range(1, count + 1))


def video_prefix(count: int) -> str:
    """The model cards' chat prefix for a video's frames: `Frame1: <image>\\n` per frame."""
    return "".join(f"Frame{i}: <image>\n" for i in range(1, count + 1))


def load_video(path: str | os.PathLike, num_segments: int = 8, input_size: int = 448,
               bound: tuple[float, float] | None = None, max_num: int = 1) -> tuple[torch.Tensor, list[int]]:
    """A video as the model cards prepare it for chat: the middle frame of each segment, tiled (one tile each with
    the default max_num=1). Returns pixel values [tiles, 3, H, W] and each frame's tile count, for
    `model.chat(tokenizer, pixel_values, video_prefix(len(counts)) + question, config, num_patches_list=counts)`."""
    video = open_video(os.fspath(path))
    frames = video.read(middle_frame_indices(video.frame_count, video.fps, num_segments, bound))
    tiles = [dynamic_preprocess(frame, image_size=input_size, use_thumbnail=True, max_num=max_num) for frame in frames]
    return tiles_to_tensor([tile for frame in tiles for tile in frame], input_size), [len(frame) for frame in tiles]


@contextmanager
def _reading(path: str) -> Iterator[av.container.InputContainer]:
    """`av.open` of a file for reading, its FFmpeg errors (on opening, demuxing, decoding) as SampleErrors."""
    try:
        with av.open(path) as container:
            yield container
    except av.error.FFmpegError as error:
        raise SampleError(UNREADABLE_VIDEO, f"{path}: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    """FFmpeg's own words, without the errno and file name PyAV adds around them."""
    return getattr(error, "strerror", None) or str(error)


@functools.cache
def _image_extensions() -> frozenset[str]:
    """The file extensions PIL opens."""
    Image.init()
    return frozenset(extension for extension, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def _natural_key(name: str) -> list:
    """Sort key putting `frame_2.jpg` before `frame_10.jpg`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
