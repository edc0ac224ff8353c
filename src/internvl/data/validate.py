"""Check a whole training set before training: every line of every JSONL, every image and video, every tokenization.

`validate_dataset` runs each record through the same checks as the training dataset (`SampleBuilder.check`:
parse, placeholders, full image decode with the decompression-bomb guard, tile count, each video opened, indexed
and decoded where its clip starts and ends, template tokenization, length), in parallel processes, and reports
each problem as `FILE:LINE: cause: detail`. Unlike training, it
reads every line of the annotation files, including those a repeat_time < 1 leaves out. A meta entry's own
problems (no records, a repeat_time keeping none, a wrong `length`) are lines at the meta file, `META: cause: ...`.

A sample over the length limit counts as a problem too, `sample truncated`: training cuts it and goes on, as the
official trainer does, and so learns its answers only up to the cut; the line says how many tokens and how many
answer tokens are lost, so that no answer is cut unnoticed. Raise --max_seq_length or shorten the sample.

The `validate-data` subcommand reads the settings from a checkpoint's config.json (as plain JSON: data never
imports the model), prints one line per problem (compiler style), then counts per cause and per dataset, and
exits with status 1 when anything is wrong. A meta file it cannot go through (malformed, naming no dataset, or a
name twice) or a --max_seq_length below 1 is one error line instead, status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from internvl import checkpoint
from internvl.data.constants import MAX_NUM_FRAME, MIN_NUM_FRAME
from internvl.data.errors import MISSING_ANNOTATION, SampleError
from internvl.data.reading import Annotations, DatasetSpec, LineIndex, iter_lines, parse_record, read_meta

if TYPE_CHECKING:  # the dataset loads transformers, seconds: only a validation run needs it, not the CLI
    from internvl.data.dataset import SampleBuilder

DEFAULT_MAX_SEQ_LENGTH = 8192  # the fine-tune command's default
LINES_PER_TASK = 64  # records one worker checks per task: enough to amortise the hand-over, small enough to balance


@dataclass
class ValidationReport:
    """Problems found per dataset (in file order) and how many lines each dataset has."""

    problems: dict[str, list[SampleError]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not any(self.problems.values())

    def all_problems(self) -> list[SampleError]:
        """Every problem, dataset by dataset, in file order."""
        return [problem for problems in self.problems.values() for problem in problems]

    def by_cause(self) -> Counter:
        """Number of problems per cause."""
        return Counter(problem.cause for problem in self.all_problems())

    def summary(self) -> str:
        """Counts per cause and per dataset, as printed after the problem lines."""
        total = sum(len(problems) for problems in self.problems.values())
        lines = [f"checked {sum(self.lines.values())} lines in {len(self.lines)} datasets: {total} problems"]
        if total:
            lines.append("problems per cause:")
            lines += [f"  {cause}: {count}" for cause, count in self.by_cause().most_common()]
            lines.append("problems per dataset:")
            lines += [
                f"  {name}: {len(problems)} in {self.lines[name]} lines"
                for name, problems in self.problems.items()
                if problems
            ]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Task:
    """A run of annotation lines for one worker: the bytes [start, stop) of a file, starting at line first_line."""

    spec: DatasetSpec
    start: int
    stop: int | None
    first_line: int


def validate_dataset(
    meta_path: str | os.PathLike,
    builder: SampleBuilder,
    workers: int = 1,
    on_problem: Callable[[SampleError], None] | None = None,
) -> ValidationReport:
    """Check every record of every dataset of a meta file, with `workers` processes; the problems found.

    `builder` is the training dataset's: the same settings, the same checks. `on_problem` is called with each
    problem as soon as it is known, in file order (the command prints them so). A malformed meta file raises
    ValueError; an annotation file that cannot be read is a problem of its dataset (`FILE: missing annotation: ...`).
    """
    specs = read_meta(meta_path)
    report = ValidationReport({spec.name: [] for spec in specs}, {spec.name: 0 for spec in specs})

    def found(dataset: str, problem: SampleError) -> None:
        report.problems[dataset].append(problem)
        if on_problem is not None:
            on_problem(problem)

    tasks = []
    for spec in specs:
        try:
            annotations = Annotations(spec)
        except OSError as error:
            found(spec.name, SampleError(MISSING_ANNOTATION, error.strerror or str(error), spec.annotation))
            continue
        for problem in annotations.problems(meta_path):
            found(spec.name, problem)
        report.lines[spec.name] = len(annotations.index)
        tasks += _split(spec, annotations.index)
    for task, problems in zip(tasks, _run(tasks, builder, workers)):
        for problem in problems:
            found(task.spec.name, problem)
    return report


def _split(spec: DatasetSpec, index: LineIndex) -> Iterator[_Task]:
    """The tasks covering all lines of one annotation file."""
    for first in range(0, len(index), LINES_PER_TASK):
        after = first + LINES_PER_TASK
        stop = index.offsets[after] if after < len(index) else None
        yield _Task(spec, index.offsets[first], stop, index.line_numbers[first])


def _run(tasks: list[_Task], builder: SampleBuilder, workers: int) -> Iterator[list[SampleError]]:
    """Each task's problems, in task order, as soon as they are known; in this process when workers <= 1."""
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(builder)
        yield from map(_check_task, tasks)
        return
    # The builder (with its tokenizer) goes to each worker once, through the initializer, not with every task.
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(builder,)) as pool:
        yield from pool.map(_check_task, tasks)


_builder: SampleBuilder | None = None  # the worker process's builder, set by _init_worker


def _init_worker(builder: SampleBuilder) -> None:
    global _builder
    _builder = builder


def _check_task(task: _Task) -> list[SampleError]:
    """Check the task's lines; the problems found."""
    problems = []
    for line, _, raw in iter_lines(task.spec.annotation, task.start, task.stop, task.first_line):
        try:
            record = parse_record(raw, task.spec.annotation, line, task.spec.root)
            problem = _builder.check(record, task.spec.max_dynamic_patch)  # None, or one that training lives with
        except SampleError as error:
            problem = error
        if problem is not None:
            problems.append(problem)
    return problems


def settings_from_config(config: dict) -> dict:
    """`SampleBuilder`'s model settings (keyword arguments) from a checkpoint's config.json (defaults: the official
    config's)."""
    if not config.get("template"):
        raise ValueError("config.json has no 'template' (the conversation template name)")
    vision = config.get("vision_config") or {}
    image_size = config.get("force_image_size") or vision.get("image_size")
    if not image_size:
        raise ValueError("config.json has neither 'force_image_size' nor 'vision_config.image_size'")
    patch_size = vision.get("patch_size", 14)
    downsample_ratio = config.get("downsample_ratio", 0.5)
    return dict(
        template_name=config["template"],
        num_image_token=int((image_size // patch_size) ** 2 * downsample_ratio**2),
        image_size=image_size,
        dynamic_image_size=config.get("dynamic_image_size", False),
        use_thumbnail=config.get("use_thumbnail", False),
        min_dynamic_patch=config.get("min_dynamic_patch", 1),
        max_dynamic_patch=config.get("max_dynamic_patch", 6),
    )


def run(args: argparse.Namespace) -> int:
    """The `validate-data` command: print each problem, then the counts; exit status 1 if any problem, else 0."""
    if args.max_seq_length < 1:
        raise ValueError(f"--max_seq_length {args.max_seq_length}: must be a positive number of tokens")
    config = checkpoint.read_config(args.model_name_or_path)
    from internvl.data.dataset import SampleBuilder
    from internvl.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model_name_or_path, args.max_seq_length)
    builder = SampleBuilder(tokenizer, max_seq_length=args.max_seq_length, min_num_frame=args.min_num_frame,
                            max_num_frame=args.max_num_frame, **settings_from_config(config))
    report = validate_dataset(args.meta_path, builder, workers=args.workers, on_problem=print)
    print(report.summary())
    return 0 if report.ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `validate-data`."""
    parser.add_argument("--meta_path", required=True, metavar="META", help="meta JSON naming the JSONL datasets")
    parser.add_argument("--model_name_or_path", required=True, metavar="MODEL",
                        help="checkpoint folder: config.json gives template and image settings, plus its tokenizer")
    parser.add_argument("--max_seq_length", type=int, default=DEFAULT_MAX_SEQ_LENGTH, metavar="N",
                        help=f"longest sample in tokens, images included (default {DEFAULT_MAX_SEQ_LENGTH})")
    parser.add_argument("--min_num_frame", type=int, default=MIN_NUM_FRAME, metavar="N",
                        help=f"fewest frames drawn from a video (default {MIN_NUM_FRAME})")
    parser.add_argument("--max_num_frame", type=int, default=MAX_NUM_FRAME, metavar="N",
                        help=f"most frames drawn from a video: its length is checked at that many (default "
                             f"{MAX_NUM_FRAME})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="processes reading and checking (default: one per CPU)")


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `validate-data` on a CLI's subparsers; its `func` is `run`."""
    parser = subparsers.add_parser(
        "validate-data",
        help="check every line, image and tokenization of a training set; FILE:LINE: cause per problem",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m internvl.data.validate", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
