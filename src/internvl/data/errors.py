"""SampleError: what is wrong with a training sample or a dataset, located as `FILE:LINE` (compiler style).

Every problem the data pipeline detects in the data has one of the causes below; the dataset's skip report and
the `validate-data` command count problems by these strings. Most make a sample unusable; a truncated sample is
still trained on (as officially), and a meta entry's wrong `length` changes nothing, but both are reported.
"""

from __future__ import annotations

NOT_UTF8 = "not UTF-8"
MALFORMED_JSON = "malformed JSON"
INVALID_RECORD = "invalid record"  # valid JSON, but not the official record layout
MISSING_ANNOTATION = "missing annotation"  # a meta entry's JSONL file cannot be read (a whole file, no line)
EMPTY_DATASET = "empty dataset"  # a meta entry gives no sample: its JSONL has no records, or repeat_time keeps none
LENGTH_MISMATCH = "length mismatch"  # a meta entry's `length` is not the record count of its JSONL
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"  # not an image, truncated or corrupt
DECOMPRESSION_BOMB = "decompression bomb"
MISSING_VIDEO = "missing video"
UNREADABLE_VIDEO = "unreadable video"  # not a video, truncated, corrupt, no video stream, a folder without frames
CLIP_OUTSIDE_VIDEO = "clip outside video"  # a record's clip needs frames its video has not
IMAGE_COUNT_MISMATCH = "image count mismatch"  # placeholders != images (<image>), or a video's <video> not one
INVALID_CONVERSATION = "invalid conversation"  # roles out of order, empty turns, no answer at the end
SAMPLE_TOO_LONG = "sample too long"  # refused: cut through an image, no answer left, or far over the limit
SAMPLE_TRUNCATED = "sample truncated"  # over the length limit: trained on its first tokens only
TOKENIZATION_MISMATCH = "tokenization mismatch"

CAUSES = (
    NOT_UTF8,
    MALFORMED_JSON,
    INVALID_RECORD,
    MISSING_ANNOTATION,
    EMPTY_DATASET,
    LENGTH_MISMATCH,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    DECOMPRESSION_BOMB,
    MISSING_VIDEO,
    UNREADABLE_VIDEO,
    CLIP_OUTSIDE_VIDEO,
    IMAGE_COUNT_MISMATCH,
    INVALID_CONVERSATION,
    SAMPLE_TOO_LONG,
    SAMPLE_TRUNCATED,
    TOKENIZATION_MISMATCH,
)


class SampleError(ValueError):
    """A problem of the data: `str()` is `FILE:LINE: cause: detail` once located (`FILE: ...` for a whole file or
    dataset). Raised for a sample that cannot be used; `validate-data` also lists those training lives with.

    Code that sees only part of a sample (an image, a conversation) raises it unlocated; the code that knows the
    record's file and line re-raises it with `located`. A single message argument also works, so the error keeps
    its type when a DataLoader worker re-raises it in the main process.
    """

    def __init__(self, cause: str, detail: str = "", file: str | None = None, line: int | None = None):
        self.cause, self.detail, self.file, self.line = cause, detail, file, line
        location = "" if file is None else f"{file}:" if line is None else f"{file}:{line}:"
        message = f"{cause}: {detail}" if detail else cause
        super().__init__(f"{location} {message}" if location else message)

    def located(self, file: str, line: int | None) -> SampleError:
        """The same problem at `file:line`."""
        return SampleError(self.cause, self.detail, file, line)
