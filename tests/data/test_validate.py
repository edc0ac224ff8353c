"""validate-data: every hostile file of a dataset folder reported as FILE:LINE: cause, with counts and exit status."""

import argparse
import json
import logging
import subprocess
import sys

import pytest

from internvl.data.dataset import InternVLDataset, SampleBuilder
from internvl.data.tokenizer import load_tokenizer
from internvl.data.validate import add_subcommand, settings_from_config, validate_dataset
from tests.data.builders import (
    CONFIG,
    GOOD,
    NUM_IMAGE_TOKEN,
    TILE,
    chat,
    corrupt_packets,
    hostile_line,
    write_dataset,
    write_frame_folder,
    write_gif,
    write_image,
    write_video,
)


def parse(argv: list[str]) -> argparse.Namespace:
    """argv parsed by a CLI that registers validate-data as the project's CLI does."""
    parser = argparse.ArgumentParser(prog="internvl-lora")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def hostile_folder(tmp_path):
    """Two datasets: 'clean' is fine; 'hostile' holds every kind of bad line, each after a good one."""
    write_image(tmp_path / "images/ok.png", 2 * TILE, TILE)
    kinds = ["bomb", "truncated", "text", "not-utf8", "malformed", "missing", "two-placeholders", "roles"]
    hostile = []
    for kind in kinds:
        hostile += [{"image": "images/ok.png", "conversations": chat("What is in the image?", "A red line.")},
                    hostile_line(tmp_path, kind)]
    clean = write_dataset(tmp_path, [GOOD] * 3, name="clean")
    return write_dataset(tmp_path, hostile, name="hostile", meta=json.loads(clean.read_text()))


def expected_problems(folder) -> list[str]:
    hostile = folder / "hostile.jsonl"
    return [
        f"{hostile}:2: decompression bomb: {folder / 'bomb.png'}: Image size (10000000000 pixels) exceeds limit",
        f"{hostile}:4: unreadable image: {folder / 't.jpg'}: image file is truncated",
        f"{hostile}:6: unreadable image: {folder / 'x.jpg'}: cannot identify image file",
        f"{hostile}:8: not UTF-8: byte 0xe9 at column 51",
        f"{hostile}:10: malformed JSON: Expecting value at column 20",
        f"{hostile}:12: missing image: {folder / 'nope.png'}",
        f"{hostile}:14: image count mismatch: 1 image(s) but 2 <image> placeholder(s)",
        f"{hostile}:16: invalid conversation: turn 1: expected from='gpt', got 'human'",
    ]


def test_validate_data_prints_each_problem_then_counts_and_fails(hostile_folder, model_dir, capsys):
    args = parse(["validate-data", "--meta_path", str(hostile_folder), "--model_name_or_path", str(model_dir),
                  "--workers", "2"])
    assert args.func(args) == 1
    lines = capsys.readouterr().out.splitlines()
    problems = expected_problems(hostile_folder.parent)
    assert len(lines) > len(problems)
    for line, expected in zip(lines, problems):
        assert line.startswith(expected)
    assert lines[len(problems):] == [
        "checked 19 lines in 2 datasets: 8 problems",
        "problems per cause:",
        "  unreadable image: 2",
        "  decompression bomb: 1",
        "  not UTF-8: 1",
        "  malformed JSON: 1",
        "  missing image: 1",
        "  image count mismatch: 1",
        "  invalid conversation: 1",
        "problems per dataset:",
        "  hostile: 8 in 16 lines",
    ]


def test_validate_data_passes_a_clean_dataset(tmp_path, model_dir, capsys):
    write_image(tmp_path / "a.png", TILE, 3 * TILE)
    meta = write_dataset(tmp_path, [GOOD, {"image": "a.png", "conversations": chat("What?", "A column.")}])
    args = parse(["validate-data", "--meta_path", str(meta), "--model_name_or_path", str(model_dir)])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "checked 2 lines in 1 datasets: 0 problems\n"


VIDEO_QUESTION = chat("<video>\nWhat happens?", "Colours change.")


def test_validate_data_opens_and_probes_every_video(tmp_path, model_dir, capsys):
    write_video(tmp_path / "v.mp4")
    write_gif(tmp_path / "v.gif")
    write_frame_folder(tmp_path / "frames")
    good = [{"video": "v.mp4", "conversations": VIDEO_QUESTION},
            {"video": "v.gif", "clip": [0.2, 1.5], "conversations": VIDEO_QUESTION},
            {"video": "frames", "conversations": VIDEO_QUESTION}]
    kinds = ["missing-video", "truncated-video", "corrupt-video", "text-video", "empty-folder", "clip-outside",
             "two-videos"]
    meta = write_dataset(tmp_path, good + [hostile_line(tmp_path, kind) for kind in kinds])
    args = parse(["validate-data", "--meta_path", str(meta), "--model_name_or_path", str(model_dir),
                  "--workers", "2"])
    assert args.func(args) == 1
    lines = capsys.readouterr().out.splitlines()
    at = f"{tmp_path / 'ds.jsonl'}"
    expected = [
        f"{at}:4: missing video: {tmp_path / 'gone.mp4'}",
        f"{at}:5: unreadable video: {tmp_path / 'cut.mp4'}: ",
        f"{at}:6: unreadable video: {tmp_path / 'garbled.mp4'}: Invalid data found when processing input",
        f"{at}:7: unreadable video: {tmp_path / 'notes.mp4'}: Invalid data found when processing input",
        f"{at}:8: unreadable video: {tmp_path / 'no_frames'}: a frame folder without image files",
        f"{at}:9: clip outside video: [1.5, 2.5] s of {tmp_path / 'ok.mp4'}, which has 20 frames at 10 fps (2 s)",
        f"{at}:10: image count mismatch: a video needs one <video> and no <image>; found 2 and 0",
    ]
    assert len(lines) > len(expected) and all(line.startswith(want) for line, want in zip(lines, expected))
    assert lines[len(expected)] == "checked 10 lines in 1 datasets: 7 problems"


def test_a_video_is_probed_at_its_ends_not_decoded_through(tmp_path, model_dir, capsys):
    # Frames 12 to 17 do not decode: training reads them only when it draws one, validation never.
    corrupt_packets(write_video(tmp_path / "v.mp4", frames=30, keyframe_every=10), range(12, 18))
    corrupt_packets(write_video(tmp_path / "tail.mp4", frames=30, keyframe_every=10), range(25, 30))
    meta = write_dataset(tmp_path, [{"video": name, "conversations": VIDEO_QUESTION} for name in ("v.mp4", "tail.mp4")])
    args = parse(["validate-data", "--meta_path", str(meta), "--model_name_or_path", str(model_dir)])
    assert args.func(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'ds.jsonl'}:2: unreadable video: {tmp_path / 'tail.mp4'}: ")
    assert lines[1] == "checked 2 lines in 1 datasets: 1 problems"


def test_a_video_line_is_checked_at_its_most_frames(tmp_path, model_dir, capsys):
    write_video(tmp_path / "v.mp4")
    meta = write_dataset(tmp_path, [{"video": "v.mp4", "conversations": VIDEO_QUESTION}])
    common = ["validate-data", "--meta_path", str(meta), "--model_name_or_path", str(model_dir),
              "--max_seq_length", "300", "--min_num_frame", "2"]
    fits = parse([*common, "--max_num_frame", "4"])  # 265 tokens, 16 of them image tokens
    assert fits.func(fits) == 0
    capsys.readouterr()
    too_many = parse([*common, "--max_num_frame", "32"])  # 112 image tokens more
    assert too_many.func(too_many) == 1
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'ds.jsonl'}:1: sample too long: ")


def test_validate_data_names_a_model_folder_that_is_not_an_internvl_checkpoint(tmp_path):
    meta = write_dataset(tmp_path, [GOOD])
    args = parse(["validate-data", "--meta_path", str(meta), "--model_name_or_path", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no config.json; expected an InternVL checkpoint"):
        args.func(args)


@pytest.mark.parametrize(
    "meta, option, error",
    [
        ("{{}}", [], "{meta}: names no datasets"),
        ('{{"x": {entry}, "x": {entry}}}', [],
         "{meta}: 'x' appears twice in one object; JSON would keep only the last"),
        ('{{"x": {entry}}}', ["--max_seq_length", "0"], "--max_seq_length 0: must be a positive number of tokens"),
        ('{{"x": {entry}}}', ["--max_seq_length", "-1"], "--max_seq_length -1: must be a positive number of tokens"),
    ],
    ids=["no datasets", "a name twice", "no tokens", "negative tokens"],
)
def test_a_meta_file_or_option_that_cannot_be_checked_is_one_error_line(tmp_path, model_dir, capsys, meta, option,
                                                                         error):
    from internvl.cli import main

    entry = json.loads(write_dataset(tmp_path, [GOOD]).read_text())["ds"]
    path = tmp_path / "bad_meta.json"
    path.write_text(meta.format(entry=json.dumps(entry)))
    assert main(["validate-data", "--meta_path", str(path), "--model_name_or_path", str(model_dir), *option]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"internvl-lora validate-data: error: {error.format(meta=path)}\n")


def test_max_seq_length_option_limits_samples(tmp_path, model_dir, capsys):
    meta = write_dataset(tmp_path, [GOOD])
    args = parse(["validate-data", "--meta_path", str(meta), "--model_name_or_path", str(model_dir),
                  "--max_seq_length", "40"])
    assert args.func(args) == 1
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'ds.jsonl'}:1: sample too long: no answer token")


def test_a_sample_over_the_limit_is_a_problem_saying_what_training_would_cut(tmp_path, model_dir, capsys, caplog):
    long = {"conversations": chat("What colour is it?", "Black and white. " * 50)}
    meta = write_dataset(tmp_path, [GOOD, long])
    args = parse(["validate-data", "--meta_path", str(meta), "--model_name_or_path", str(model_dir),
                  "--max_seq_length", "300"])
    assert args.func(args) == 1
    lines = capsys.readouterr().out.splitlines()
    builder = SampleBuilder(load_tokenizer(model_dir), max_seq_length=300, **settings_from_config(CONFIG))
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        InternVLDataset(meta, builder)[1]
    (trained,) = [record.getMessage() for record in caplog.records]  # what training logs for the line
    assert lines[0] == (f"{tmp_path / 'ds.jsonl'}:2: sample truncated: 490 tokens, 190 over the limit of 300 "
                        "(189 answer tokens lost)")
    assert trained.startswith(lines[0] + ";")
    assert lines[1:] == ["checked 2 lines in 1 datasets: 1 problems", "problems per cause:", "  sample truncated: 1",
                         "problems per dataset:", "  ds: 1 in 2 lines"]


def test_workers_do_not_change_the_report(hostile_folder, chat_tokenizer):
    builder = SampleBuilder(chat_tokenizer, max_seq_length=4096, **settings_from_config(CONFIG))
    one = validate_dataset(hostile_folder, builder, workers=1)
    two = validate_dataset(hostile_folder, builder, workers=2)
    assert [str(p) for p in one.all_problems()] == [str(p) for p in two.all_problems()]
    assert one.lines == two.lines == {"clean": 3, "hostile": 16}
    assert not one.ok and one.problems["clean"] == []


def test_many_lines_are_split_across_workers_in_order(tmp_path, chat_tokenizer):
    records = [GOOD] * 150
    records[3] = records[140] = {"conversations": chat("<image>q", "a")}  # lines 4 and 141: in different tasks
    meta = write_dataset(tmp_path, records)
    report = validate_dataset(meta, SampleBuilder(chat_tokenizer, "internvl2_5", NUM_IMAGE_TOKEN, max_seq_length=4096),
                              workers=2)
    assert [(p.line, p.cause) for p in report.all_problems()] == [(4, "image count mismatch"),
                                                                   (141, "image count mismatch")]


def test_worker_processes_refuse_a_line_far_over_the_limit_too(tmp_path, chat_tokenizer):
    records = [GOOD] * 100
    records[90] = {"conversations": chat("q", "Black and white. " * 500)}  # line 91: in the second task
    meta = write_dataset(tmp_path, records)
    builder = SampleBuilder(chat_tokenizer, "internvl2_5", NUM_IMAGE_TOKEN, max_seq_length=300)
    (problem,) = validate_dataset(meta, builder, workers=2).all_problems()
    assert str(problem).startswith(f"{tmp_path / 'ds.jsonl'}:91: sample too long: 8500 bytes of text make at least "
                                   "654 tokens")


def test_an_unreadable_annotation_file_is_a_problem_of_its_dataset(tmp_path, chat_tokenizer):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"gone": {"root": str(tmp_path), "annotation": str(tmp_path / "gone.jsonl")}}))
    report = validate_dataset(meta, SampleBuilder(chat_tokenizer, "internvl2_5", NUM_IMAGE_TOKEN, max_seq_length=4096))
    assert [str(p) for p in report.all_problems()] == [
        f"{tmp_path / 'gone.jsonl'}: missing annotation: No such file or directory"
    ]


def test_a_dataset_giving_no_sample_or_claiming_a_wrong_length_is_one_line_at_the_meta(tmp_path, model_dir, capsys):
    empty = write_dataset(tmp_path, [], name="empty")
    cut = write_dataset(tmp_path, [GOOD] * 10, name="cut", meta=json.loads(empty.read_text()), repeat_time=0.01)
    meta = write_dataset(tmp_path, [GOOD] * 2, name="claims", meta=json.loads(cut.read_text()), length=3)
    args = parse(["validate-data", "--meta_path", str(meta), "--model_name_or_path", str(model_dir)])
    assert args.func(args) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{meta}: empty dataset: 'empty' ({tmp_path / 'empty.jsonl'}) has no records",
        f"{meta}: empty dataset: 'cut' ({tmp_path / 'cut.jsonl'}): repeat_time 0.01 keeps none of its 10 record(s)",
        f"{meta}: length mismatch: 'claims' ({tmp_path / 'claims.jsonl'}) has 2 record(s), but its length says 3",
        "checked 12 lines in 3 datasets: 3 problems",
        "problems per cause:",
        "  empty dataset: 2",
        "  length mismatch: 1",
        "problems per dataset:",
        "  empty: 1 in 0 lines",
        "  cut: 1 in 10 lines",
        "  claims: 1 in 2 lines",
    ]


def test_settings_come_from_the_checkpoint_config():
    official = {"template": "internvl2_5", "force_image_size": 448, "downsample_ratio": 0.5,
                "vision_config": {"image_size": 448, "patch_size": 14}, "dynamic_image_size": True,
                "use_thumbnail": True, "max_dynamic_patch": 12}
    assert settings_from_config(official) == dict(
        template_name="internvl2_5", num_image_token=256, image_size=448, dynamic_image_size=True,
        use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12,
    )
    no_force = {"template": "Hermes-2", "vision_config": {"image_size": 224, "patch_size": 14}}
    assert settings_from_config(no_force)["num_image_token"] == 64  # (224 // 14)^2 * 0.5^2
    with pytest.raises(ValueError, match="template"):
        settings_from_config({"vision_config": {"image_size": 448}})


def test_module_runs_as_a_script(hostile_folder, model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "internvl.data.validate", "--meta_path", str(hostile_folder),
         "--model_name_or_path", str(model_dir), "--workers", "1"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(expected_problems(hostile_folder.parent)[0])
