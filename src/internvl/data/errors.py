"""SampleError: why one training sample cannot be used, located as `FILE:LINE` (compiler style).

Every bad input the data pipeline detects has one of the causes below; the dataset's skip report and the
`validate-data` command count problems by these strings.
"""

from __future__ import annotations

NOT_UTF8 = "not UTF-8"
MALFORMED_JSON = "malformed JSON"
INVALID_RECORD = "invalid record"  # valid JSON, but not the official record layout
MISSING_ANNOTATION = "missing annotation"  # a meta entry's JSONL file cannot be read (a whole file, no line)
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"  # not an image, truncated or corrupt
DECOMPRESSION_BOMB = "decompression bomb"
IMAGE_COUNT_MISMATCH = "image count mismatch"  # number of <image> placeholders != number of images
INVALID_CONVERSATION = "invalid conversation"  # roles out of order, empty turns, no answer at the end
SAMPLE_TOO_LONG = "sample too long"
TOKENIZATION_MISMATCH = "tokenization mismatch"

CAUSES = (
    NOT_UTF8,
    MALFORMED_JSON,
    INVALID_RECORD,
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    DECOMPRESSION_BOMB,
    IMAGE_COUNT_MISMATCH,
    INVALID_CONVERSATION,
    SAMPLE_TOO_LONG,
    TOKENIZATION_MISMATCH,
)


class SampleError(ValueError):
    """A bad sample: `str()` is `FILE:LINE: cause: detail` once located (`FILE: ...` for a whole file).

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
