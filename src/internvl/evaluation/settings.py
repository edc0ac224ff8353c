"""What an evaluation evaluates and how; plain data, so that the command line reads its defaults without loading
the model code."""

from __future__ import annotations

from dataclasses import dataclass

from internvl.data.validate import DEFAULT_MAX_SEQ_LENGTH


@dataclass(frozen=True)
class EvalSettings:
    """The held-out data (a meta JSON), how many samples per dataset (None: all, else a choice seeded by `seed`),
    the generation batch size, the longest answer and the sample length limit (the fine-tune command's default)."""

    meta_path: str
    max_samples: int | None = None
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 128
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples {self.max_samples}: must be at least 1")
