"""Reading the official data layout: meta JSON, lazily indexed JSONL records, images opened with guards."""

import json

import pytest
from PIL import Image

from internvl.data.errors import SampleError
from internvl.data.reading import (
    Annotations,
    LineIndex,
    open_image,
    parse_record,
    read_meta,
)
from tests.data.builders import chat, png_header, truncated_jpeg, write_dataset, write_image


# --- meta -------------------------------------------------------------------------------------------------------


def test_meta_entries_in_file_order_with_defaults(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "b": {"root": "r1", "annotation": "a.jsonl", "data_augment": True, "repeat_time": 2, "max_dynamic_patch": 4,
              "length": 10},
        "a": {"root": "r2", "annotation": "b.jsonl"},
    }))
    first, second = read_meta(meta)
    assert (first.name, first.root, first.annotation) == ("b", "r1", "a.jsonl")
    assert (first.data_augment, first.repeat_time, first.max_dynamic_patch, first.length) == (True, 2, 4, 10)
    assert (second.name, second.data_augment, second.repeat_time, second.max_dynamic_patch) == ("a", False, 1, None)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"x": {"root": "r"}}', "dataset 'x': needs string fields 'root' and 'annotation'"),
        ('{"x": {"root": "r", "annotation": "a", "repeat_time": 0}}', "repeat_time must be a positive number"),
        ('{"x": {"root": "r", "annotation": "a", "repeat_time": 1.5}}', "must be a whole number"),
        ('{"x": {"root": "r", "annotation": "a", "max_dynamic_patch": "6"}}', "max_dynamic_patch must be a positive"),
        ("{}", "names no datasets"),
        ('{"x": {"root": "r", "annotation": "a"}, "x": {"root": "s", "annotation": "b"}}',
         "'x' appears twice in one object; JSON would keep only the last"),
        ('{"x": {"root": "r", "annotation": "a", "root": "s"}}', "'root' appears twice"),
        (b'{"caf\xe9": {}}', "can't decode byte 0xe9"),
    ],
)
def test_malformed_meta_names_the_file_and_entry(tmp_path, content, message):
    meta = tmp_path / "meta.json"
    meta.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as error:
        read_meta(meta)
    assert str(meta) in str(error.value)


# --- lazy JSONL index -------------------------------------------------------------------------------------------


def test_line_index_records_line_starts_and_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [b'{"a": 1}\n', b"\n", b'{"bb": 22}\r\n', b"   \n", "{\"c\": \"\u00e9\"}".encode() + b"\n", b'{"d": 4}']
    path.write_bytes(b"".join(lines))
    index = LineIndex(str(path))
    starts = [sum(len(line) for line in lines[:i]) for i in range(len(lines))]
    assert list(index.offsets) == [starts[0], starts[2], starts[4], starts[5]]
    assert list(index.line_numbers) == [1, 3, 5, 6]
    assert [index.read(i) for i in range(len(index))] == [lines[0], lines[2], lines[4], lines[5]]


def test_line_index_reads_on_demand_not_at_indexing(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"v": 1}\n{"v": 2}\n')
    index = LineIndex(str(path))
    path.write_bytes(b'{"v": 1}\n{"v": 9}\n')  # same length, new content: only offsets were kept
    assert index.read(1) == b'{"v": 9}\n'


def test_repeat_time_below_one_keeps_the_first_lines(tmp_path):
    records = [{"conversations": chat(f"q{i}", f"a{i}")} for i in range(5)]
    meta = write_dataset(tmp_path, records, repeat_time=0.5)
    annotations = Annotations(read_meta(meta)[0])
    assert len(annotations) == 2  # int(5 * 0.5), the official rule (no shuffle)
    assert [annotations.record(i).conversations[0]["value"] for i in range(2)] == ["q0", "q1"]


def test_repeat_time_above_one_repeats_every_line(tmp_path):
    records = [{"conversations": chat(f"q{i}", f"a{i}")} for i in range(5)]
    meta = write_dataset(tmp_path, records, repeat_time=3)
    annotations = Annotations(read_meta(meta)[0])
    assert len(annotations) == 15
    assert [annotations.record(i).line for i in (0, 4, 5, 7, 14)] == [1, 5, 1, 3, 5]


@pytest.mark.parametrize(
    "count, entry, problem",
    [
        (0, {}, "empty dataset: 'ds' ({annotation}) has no records"),
        (10, {"repeat_time": 0.01},
         "empty dataset: 'ds' ({annotation}): repeat_time 0.01 keeps none of its 10 record(s)"),
        (2, {"length": 3}, "length mismatch: 'ds' ({annotation}) has 2 record(s), but its length says 3"),
        (2, {"length": "2"}, "length mismatch: 'ds' ({annotation}) has 2 record(s), but its length says '2'"),
        (1, {"length": True}, "length mismatch: 'ds' ({annotation}) has 1 record(s), but its length says True"),
        (2, {}, None),
        (2, {"length": None}, None),  # no claim, nothing to check
        (10, {"repeat_time": 0.1}, None),
    ],
)
def test_an_entry_giving_no_sample_or_a_wrong_length_is_a_problem_at_the_meta_file(tmp_path, count, entry, problem):
    records = [{"conversations": chat(f"q{i}", f"a{i}")} for i in range(count)]
    meta = write_dataset(tmp_path, records, **entry)  # its length: the record count unless the entry says otherwise
    problems = [str(found) for found in Annotations(read_meta(meta)[0]).problems(meta)]
    assert problems == ([] if problem is None else [f"{meta}: {problem.format(annotation=tmp_path / 'ds.jsonl')}"])


# --- records ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, expected",
    [
        ("a.jpg", ("root/a.jpg",)),
        (["a.jpg", "sub/b.png"], ("root/a.jpg", "root/sub/b.png")),
        (None, ()),
        ("", ()),
        ([], ()),
    ],
)
def test_image_paths_are_joined_to_the_root(image, expected):
    record = {"conversations": chat("q", "a")}
    if image is not None:
        record["image"] = image
    parsed = parse_record(json.dumps(record).encode(), "f.jsonl", 7, "root")
    assert (parsed.file, parsed.line, parsed.images) == ("f.jsonl", 7, expected)
    assert parsed.conversations == record["conversations"]


@pytest.mark.parametrize(
    "fields, video, clip",
    [
        ({"video": "clips/v.mp4"}, "root/clips/v.mp4", None),
        ({"video": "frames/", "clip": [0.5, 3]}, "root/frames/", (0.5, 3)),
        ({"video": ""}, None, None),  # "" and null mean no video, as officially
        ({"video": None, "clip": None}, None, None),
    ],
)
def test_a_video_line_gives_its_path_joined_to_the_root_and_its_clip(fields, video, clip):
    parsed = parse_record(json.dumps({**fields, "conversations": chat("q", "a")}).encode(), "f.jsonl", 7, "root")
    assert (parsed.images, parsed.video, parsed.clip) == ((), video, clip)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"conversations": [}', "f.jsonl:3: malformed JSON: Expecting value at column 20"),
        (b'{"conversations": "caf\xe9"}', "f.jsonl:3: not UTF-8: byte 0xe9 at column 23"),
        (b"[1]", "f.jsonl:3: invalid record: expected a JSON object, got list"),
        (b'{"image": "a.jpg"}', "f.jsonl:3: invalid record: 'conversations' must be a non-empty list"),
        (b'{"conversations": [{"from": "human"}]}', "f.jsonl:3: invalid record: conversations[0] needs string"),
        (b'{"image": 3, "conversations": [{"from": "human", "value": "q"}]}', "f.jsonl:3: invalid record: 'image'"),
        (b'{"video": ["v.mp4"], "conversations": [{"from": "human", "value": "q"}]}',
         "f.jsonl:3: invalid record: 'video' must be one path, on a line without 'image'"),
        (b'{"video": "v.mp4", "image": "a.jpg", "conversations": [{"from": "human", "value": "q"}]}',
         "f.jsonl:3: invalid record: 'video' must be one path, on a line without 'image'"),
        *[(b'{"video": "v.mp4", "clip": %s, "conversations": [{"from": "human", "value": "q"}]}' % clip,
           "f.jsonl:3: invalid record: 'clip' must be [start, end] in seconds, 0 <= start < end, beside a 'video'")
          for clip in (b"[2, 1]", b"[-1, 1]", b"[0]", b'["0", "1"]', b"[true, 2]", b"3")],
        (b'{"clip": [0, 1], "conversations": [{"from": "human", "value": "q"}]}',
         "f.jsonl:3: invalid record: 'clip' must be [start, end] in seconds"),
    ],
)
def test_bad_lines_raise_located_sample_errors(raw, message):
    with pytest.raises(SampleError) as error:
        parse_record(raw, "f.jsonl", 3, "root")
    assert str(error.value).startswith(message)
    assert (error.value.file, error.value.line) == ("f.jsonl", 3)


# --- images -----------------------------------------------------------------------------------------------------


def test_open_image_decodes_to_rgb(tmp_path):
    path = tmp_path / "p.png"
    Image.new("P", (5, 3), 7).save(path)
    image = open_image(str(path))
    assert (image.mode, image.size) == ("RGB", (5, 3))


@pytest.mark.parametrize(
    "write, cause",
    [
        (None, "missing image"),
        (lambda p: p.write_text("this is not an image\n"), "unreadable image"),
        (lambda p: p.write_bytes(truncated_jpeg()), "unreadable image"),
        (lambda p: p.write_bytes(png_header(100_000, 100_000)), "decompression bomb"),  # over 2x PIL's limit
        (lambda p: p.write_bytes(png_header(10_000, 10_000)), "decompression bomb"),  # between 1x and 2x
    ],
    ids=["missing", "text", "truncated", "bomb", "bomb-warning"],
)
def test_bad_images_raise_their_cause(tmp_path, write, cause):
    path = tmp_path / "image.jpg"
    if write:
        write(path)
    with pytest.raises(SampleError) as error:
        open_image(str(path))
    assert error.value.cause == cause
    assert str(path) in str(error.value)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = write_image(tmp_path / "a.png", 20, 10)
    assert open_image(str(path), max_pixels=200).size == (20, 10)
    with pytest.raises(SampleError, match="decompression bomb: .*20x10 pixels, more than 199"):
        open_image(str(path), max_pixels=199)


def test_bombs_are_refused_even_with_pil_guard_switched_off(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # what the official trainer does at import
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100_000, 100_000))
    with pytest.raises(SampleError, match="decompression bomb: .*100000x100000 pixels, more than 89478485"):
        open_image(str(path))
