"""InternVLDataset: official-format folders -> tiles, input ids and labels; bad samples raise or are skipped."""

import json
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from internvl.data.collate import Collator
from internvl.data.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl.data.dataset import InternVLDataset, SampleBuilder
from internvl.data.errors import SampleError
from internvl.data.tiling import dynamic_preprocess, tiles_to_tensor
from tests.data.builders import (
    GOOD,
    NUM_IMAGE_TOKEN,
    TILE,
    chat,
    hostile_line,
    tile_frames,
    write_dataset,
    write_frame_folder,
    write_gif,
    write_image,
    write_video,
)

SETTINGS = dict(image_size=TILE, dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6)


def make_dataset(meta, tokenizer, template="internvl2_5", skip_bad_samples=False, **overrides) -> InternVLDataset:
    builder = SampleBuilder(tokenizer, template, NUM_IMAGE_TOKEN, **{**SETTINGS, **overrides})
    return InternVLDataset(meta, builder, skip_bad_samples=skip_bad_samples)


def learned_texts(tokenizer, labels: torch.Tensor) -> list[str]:
    """The decoded runs of labels that are learned (not IGNORE_INDEX)."""
    runs, current = [], []
    for label in [*labels.tolist(), IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def image_tokens(tokenizer, input_ids: torch.Tensor) -> int:
    return int((input_ids == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)).sum())


@pytest.fixture
def official_folder(tmp_path):
    """A small dataset in the official format: one, two and no images, and a two-round conversation."""
    write_image(tmp_path / "images/wide.png", 3 * TILE, TILE)  # 3:1 -> 3 tiles + thumbnail
    write_image(tmp_path / "images/tall.jpg", TILE, 2 * TILE, color=(20, 160, 40))  # 1:2 -> 2 tiles + thumbnail
    records = [
        {"image": "images/wide.png", "conversations": chat("<image>\nWhat is in the image?", "A red square.")},
        {"image": ["images/wide.png", "images/tall.jpg"],
         "conversations": chat("<image>\n<image>\nDescribe the picture.", "Two shapes.")},
        {"conversations": chat("What colour is it?", "Black and white.")},
        {"image": "images/tall.jpg",
         "conversations": chat("<image>\nWhat is in the image?", "A green square.", "How many shapes?", "Two.")},
    ]
    return tmp_path, write_dataset(tmp_path, records)


def test_end_to_end_from_folder_to_batch(official_folder, chat_tokenizer):
    folder, meta = official_folder
    dataset = make_dataset(meta, chat_tokenizer)
    assert len(dataset) == 4
    samples = [dataset[i] for i in range(4)]

    expected_tiles = [4, 4 + 3, 1, 3]  # two images: 6 // 2 = 3 tiles each, enough for (3, 1) and (1, 2), + thumbnails
    expected_answers = [["A red square.<|im_end|>"], ["Two shapes.<|im_end|>"], ["Black and white.<|im_end|>"],
                        ["A green square.<|im_end|>", "Two.<|im_end|>"]]
    for sample, tiles, answers in zip(samples, expected_tiles, expected_answers):
        assert sample["pixel_values"].shape == (tiles, 3, TILE, TILE)
        assert learned_texts(chat_tokenizer, sample["labels"]) == answers
        assert len(sample["input_ids"]) == len(sample["labels"]) == len(sample["attention_mask"])
    for sample, tiles in zip(samples, expected_tiles):
        has_image = sample is not samples[2]
        assert image_tokens(chat_tokenizer, sample["input_ids"]) == (NUM_IMAGE_TOKEN * tiles if has_image else 0)
        assert sample["image_flags"].tolist() == [int(has_image)] * tiles

    # The tiles are the official tiling of the file, normalised.
    image = Image.open(folder / "images/wide.png").convert("RGB")
    tiles = dynamic_preprocess(image, 1, 6, TILE, use_thumbnail=True)
    assert torch.equal(samples[0]["pixel_values"], tiles_to_tensor(tiles, TILE))

    loader = DataLoader(dataset, batch_size=4, collate_fn=Collator(pad_token_id=chat_tokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, max(len(s["input_ids"]) for s in samples))
    assert batch["pixel_values"].shape == (sum(expected_tiles), 3, TILE, TILE)
    assert batch["image_flags"].tolist() == [1] * 11 + [0] + [1] * 3
    for row, answers in enumerate(expected_answers):
        assert learned_texts(chat_tokenizer, batch["labels"][row]) == answers


def test_image_placeholder_is_added_to_the_first_human_turn(tmp_path, chat_tokenizer):
    write_image(tmp_path / "a.png", TILE, TILE)
    meta = write_dataset(tmp_path, [{"image": "a.png", "conversations": chat("What is in the image?", "A dot.")}])
    text = chat_tokenizer.decode(make_dataset(meta, chat_tokenizer)[0]["input_ids"])
    assert "<|im_start|>user\n<img>" + IMG_CONTEXT_TOKEN * NUM_IMAGE_TOKEN + "</img>\nWhat is in the image?" in text


def test_several_images_share_the_tile_budget(tmp_path, chat_tokenizer):
    for name in "abcd":
        write_image(tmp_path / f"{name}.png", 3 * TILE, TILE)  # 3:1
    four = {"image": ["a.png", "b.png", "c.png", "d.png"], "conversations": chat("<image>" * 4 + "Compare.", "Same.")}
    two = {"image": ["a.png", "b.png"], "conversations": chat("<image><image>Compare.", "Same.")}
    dataset = make_dataset(write_dataset(tmp_path, [two, four]), chat_tokenizer, max_dynamic_patch=4)
    assert len(dataset[0]["pixel_values"]) == 2 * (2 + 1)  # 4 // 2 = 2 tiles each: (2, 1) + thumbnail
    assert len(dataset[1]["pixel_values"]) == 4 * 1  # 4 // 4 = 1 tile each, and no thumbnail for one tile


def test_a_meta_entry_max_dynamic_patch_wins(tmp_path, chat_tokenizer):
    write_image(tmp_path / "a.png", 3 * TILE, TILE)
    record = {"image": "a.png", "conversations": chat("<image>What?", "A line.")}
    dataset = make_dataset(write_dataset(tmp_path, [record], max_dynamic_patch=2), chat_tokenizer)
    assert len(dataset[0]["pixel_values"]) == 2 + 1  # (2, 1) + thumbnail instead of (3, 1) + thumbnail


def test_without_dynamic_size_each_image_is_one_tile(tmp_path, chat_tokenizer):
    write_image(tmp_path / "a.png", 3 * TILE, TILE)
    record = {"image": ["a.png", "a.png"], "conversations": chat("<image><image>What?", "Lines.")}
    sample = make_dataset(write_dataset(tmp_path, [record]), chat_tokenizer, dynamic_image_size=False)[0]
    assert sample["pixel_values"].shape == (2, 3, TILE, TILE)
    assert image_tokens(chat_tokenizer, sample["input_ids"]) == 2 * NUM_IMAGE_TOKEN


def test_datasets_of_a_meta_file_follow_each_other_with_their_repeat_time(tmp_path, chat_tokenizer):
    first = write_dataset(tmp_path, [{"conversations": chat("q", f"first {i}")} for i in range(3)], name="one")
    meta = write_dataset(tmp_path, [{"conversations": chat("q", "second")}], name="two",
                         meta=json.loads(first.read_text()), repeat_time=2)
    dataset = make_dataset(meta, chat_tokenizer)
    assert len(dataset) == 5
    answers = [learned_texts(chat_tokenizer, dataset[i]["labels"]) for i in range(5)]
    assert answers == [["first 0<|im_end|>"], ["first 1<|im_end|>"], ["first 2<|im_end|>"],
                       ["second<|im_end|>"], ["second<|im_end|>"]]


@pytest.mark.parametrize(
    "count, entry, problem",
    [(0, {}, "has no records"), (10, {"repeat_time": 0.01}, "repeat_time 0.01 keeps none of its 10 record(s)")],
)
def test_a_dataset_giving_no_sample_is_refused_naming_the_meta_file_and_dataset(tmp_path, chat_tokenizer, count,
                                                                                 entry, problem):
    first = write_dataset(tmp_path, [GOOD], name="fine")
    meta = write_dataset(tmp_path, [GOOD] * count, name="empty", meta=json.loads(first.read_text()), **entry)
    with pytest.raises(ValueError) as error:
        make_dataset(meta, chat_tokenizer, skip_bad_samples=True)
    assert str(error.value).startswith(f"{meta}: empty dataset: 'empty' ({tmp_path / 'empty.jsonl'})")
    assert str(error.value).endswith(problem)


def test_a_wrong_length_in_the_meta_file_is_a_warning(tmp_path, chat_tokenizer, caplog):
    meta = write_dataset(tmp_path, [GOOD] * 2, length=3)
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        assert len(make_dataset(meta, chat_tokenizer)) == 2
    assert [record.getMessage() for record in caplog.records] == [
        f"{meta}: length mismatch: 'ds' ({tmp_path / 'ds.jsonl'}) has 2 record(s), but its length says 3"
    ]


def test_data_augment_reencodes_tiles_reproducibly(tmp_path, chat_tokenizer):
    write_image(tmp_path / "a.png", 2 * TILE, TILE)
    record = {"image": "a.png", "conversations": chat("<image>What?", "A line.")}
    plain = make_dataset(write_dataset(tmp_path, [record]), chat_tokenizer)[0]["pixel_values"]
    augmented = make_dataset(write_dataset(tmp_path, [record], data_augment=True), chat_tokenizer)
    torch.manual_seed(0)
    first = augmented[0]["pixel_values"]
    torch.manual_seed(0)
    assert torch.equal(first, augmented[0]["pixel_values"])
    assert first.shape == plain.shape and not torch.equal(first, plain)
    assert (first - plain).abs().mean() < 0.2  # JPEG at quality >= 75 stays close


# --- videos -----------------------------------------------------------------------------------------------------

VIDEO_QUESTION = chat("What happens?", "Colours change.")


def frame_block(frame: int) -> str:
    return f"Frame-{frame}: <img>" + IMG_CONTEXT_TOKEN * NUM_IMAGE_TOKEN + "</img>"


@pytest.mark.parametrize("kind", ["mp4", "gif", "folder"])
def test_a_video_becomes_frame_lines_of_one_tile_each_drawn_by_the_official_rule(tmp_path, chat_tokenizer, kind):
    video = {"mp4": lambda: write_video(tmp_path / "v.mp4", size=(3 * TILE, TILE)),  # 3:1, and still one tile
             "gif": lambda: write_gif(tmp_path / "v.gif"),
             "folder": lambda: write_frame_folder(tmp_path / "frames", frames=20)}[kind]()
    meta = write_dataset(tmp_path, [{"video": video.name, "conversations": VIDEO_QUESTION}] * 8)
    dataset = make_dataset(meta, chat_tokenizer, min_num_frame=3, max_num_frame=6)  # dynamic tiling on
    counts = set()
    for sample in (dataset[i] for i in range(8)):
        frames = tile_frames(sample["pixel_values"])
        count = len(frames)
        counts.add(count)
        assert 3 <= count <= 6 and sample["pixel_values"].shape == (count, 3, TILE, TILE)
        assert sample["image_flags"].tolist() == [1] * count
        bounds = np.linspace(0, 20, count + 1).astype(int)
        assert all(bounds[k] <= frame < bounds[k + 1] for k, frame in enumerate(frames))
        prompt = "\n".join(frame_block(i) for i in range(1, count + 1)) + "\nWhat happens?<|im_end|>"
        assert "<|im_start|>user\n" + prompt in chat_tokenizer.decode(sample["input_ids"])  # <video>\n prepended
        assert image_tokens(chat_tokenizer, sample["input_ids"]) == count * NUM_IMAGE_TOKEN
        assert learned_texts(chat_tokenizer, sample["labels"]) == ["Colours change.<|im_end|>"]
    assert len(counts) > 1  # the count is drawn too


def test_a_video_placeholder_in_the_text_becomes_the_frame_lines_there(tmp_path, chat_tokenizer):
    write_video(tmp_path / "v.mp4")
    record = {"video": "v.mp4", "conversations": chat("Look.\n<video>\nWhat happens?", "Colours change.")}
    sample = make_dataset(write_dataset(tmp_path, [record]), chat_tokenizer, min_num_frame=2, max_num_frame=2)[0]
    expected = "Look.\n" + frame_block(1) + "\n" + frame_block(2) + "\nWhat happens?"
    assert expected in chat_tokenizer.decode(sample["input_ids"])


def test_a_clip_draws_from_its_frames_only(tmp_path, chat_tokenizer):
    write_video(tmp_path / "v.mp4")  # 20 frames at 10 fps
    record = {"video": "v.mp4", "clip": [0.5, 1.0], "conversations": VIDEO_QUESTION}  # frames 5 to 9
    dataset = make_dataset(write_dataset(tmp_path, [record] * 6), chat_tokenizer, min_num_frame=8, max_num_frame=8)
    for i in range(6):
        frames = tile_frames(dataset[i]["pixel_values"])
        assert frames == [5, 6, 7, 8, 9, 9, 9, 9]  # five frames for eight: each once, then the last again


def video_frames(dataset, indices) -> list[list[int]]:
    return [tile_frames(dataset[i]["pixel_values"]) for i in indices]


def test_frames_are_drawn_anew_per_epoch_and_repeat_and_the_same_for_the_same_seed(tmp_path, chat_tokenizer):
    write_video(tmp_path / "v.mp4")
    meta = write_dataset(tmp_path, [{"video": "v.mp4", "conversations": VIDEO_QUESTION}], repeat_time=3)

    def dataset(seed: int, epoch: int) -> InternVLDataset:
        made = make_dataset(meta, chat_tokenizer, min_num_frame=4, max_num_frame=8)
        made.seed = seed
        made.set_epoch(epoch)
        return made

    first = video_frames(dataset(seed=0, epoch=0), range(3))
    assert first == video_frames(dataset(seed=0, epoch=0), range(3))  # reproducible: the same sample, epoch, seed
    assert len({tuple(frames) for frames in first}) == 3  # each repeat of the line draws its own frames
    assert video_frames(dataset(seed=0, epoch=1), range(3)) != first
    assert video_frames(dataset(seed=1, epoch=0), range(3)) != first


def test_the_epoch_reaches_dataloader_workers_already_started(tmp_path, chat_tokenizer):
    write_video(tmp_path / "v.mp4")
    meta = write_dataset(tmp_path, [{"video": "v.mp4", "conversations": VIDEO_QUESTION}] * 4)
    dataset = make_dataset(meta, chat_tokenizer, min_num_frame=4, max_num_frame=8)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, persistent_workers=True,
                        collate_fn=Collator(chat_tokenizer.pad_token_id))
    epochs = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        epochs.append([tile_frames(batch["pixel_values"]) for batch in loader])
    assert epochs[1] == video_frames(dataset, range(4)) != epochs[0]  # in-process draws of epoch 1


def test_videos_decode_in_dataloader_workers_forked_after_the_parent_decoded_one(tmp_path, chat_tokenizer):
    """FFmpeg's frame-scaling thread pool (PyAV 17+), started by the parent, is not there in a forked worker."""
    write_video(tmp_path / "v.mp4")
    dataset = make_dataset(write_dataset(tmp_path, [{"video": "v.mp4", "conversations": VIDEO_QUESTION}] * 4),
                           chat_tokenizer, min_num_frame=4, max_num_frame=8)
    expected = video_frames(dataset, range(4))  # decoded here, in the parent
    loader = DataLoader(dataset, batch_size=1, num_workers=2, timeout=60, multiprocessing_context="fork",
                        collate_fn=Collator(chat_tokenizer.pad_token_id))
    assert [tile_frames(batch["pixel_values"]) for batch in loader] == expected


def test_video_image_and_text_samples_share_one_batch(tmp_path, chat_tokenizer):
    write_video(tmp_path / "v.mp4")
    write_image(tmp_path / "a.png", 2 * TILE, TILE)  # (2, 1) + thumbnail
    records = [{"video": "v.mp4", "conversations": VIDEO_QUESTION},
               {"image": "a.png", "conversations": chat("<image>\nWhat is it?", "A line.")}, GOOD]
    dataset = make_dataset(write_dataset(tmp_path, records), chat_tokenizer, min_num_frame=5, max_num_frame=5)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=Collator(chat_tokenizer.pad_token_id))))
    assert batch["pixel_values"].shape == (5 + 3 + 1, 3, TILE, TILE)
    assert batch["image_flags"].tolist() == [1] * 8 + [0]
    answers = [learned_texts(chat_tokenizer, labels) for labels in batch["labels"]]
    assert answers == [["Colours change.<|im_end|>"], ["A line.<|im_end|>"], ["Black and white.<|im_end|>"]]
    assert [image_tokens(chat_tokenizer, ids) for ids in batch["input_ids"]] == [5 * NUM_IMAGE_TOKEN,
                                                                                 3 * NUM_IMAGE_TOKEN, 0]


def test_an_image_placeholder_on_a_video_line_is_a_mismatch(tmp_path, chat_tokenizer):
    write_video(tmp_path / "v.mp4")
    record = {"video": "v.mp4", "conversations": chat("<image>\nWhat happens?", "Colours change.")}
    with pytest.raises(SampleError, match="ds.jsonl:1: image count mismatch: a video needs one <video> and no "
                                          "<image>; found 1 and 1"):
        make_dataset(write_dataset(tmp_path, [record]), chat_tokenizer)[0]


def test_frame_counts_below_one_or_crossed_are_refused(chat_tokenizer):
    for low, high in [(0, 4), (8, 4)]:
        with pytest.raises(ValueError, match=f"--min_num_frame {low}, --max_num_frame {high}: a video needs"):
            SampleBuilder(chat_tokenizer, "internvl2_5", NUM_IMAGE_TOKEN, min_num_frame=low, max_num_frame=high)


def test_tokenizer_without_image_tokens_is_refused(tmp_path, model_dir):
    meta = write_dataset(tmp_path, [{"conversations": chat("q", "a")}])
    plain = PreTrainedTokenizerFast.from_pretrained(model_dir)  # not through load_tokenizer
    with pytest.raises(ValueError, match="load_tokenizer"):
        make_dataset(meta, plain)


def test_an_unknown_template_is_one_settings_error_not_a_bad_sample_per_line(tmp_path, chat_tokenizer):
    meta = write_dataset(tmp_path, [{"conversations": chat("q", "a")}] * 3)
    with pytest.raises(ValueError, match="unknown conversation template 'internvl2.5'"):
        make_dataset(meta, chat_tokenizer, "internvl2.5", skip_bad_samples=True)


# --- bad samples ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kind, cause",
    [
        ("malformed", "malformed JSON: Expecting value"),
        ("not-utf8", "not UTF-8: byte 0xe9"),
        ("missing", "missing image: "),
        ("truncated", "unreadable image: "),
        ("text", "unreadable image: "),
        ("bomb", "decompression bomb: "),
        ("two-placeholders", "image count mismatch: 1 image(s) but 2 <image> placeholder(s)"),
        ("too-few-placeholders", "image count mismatch: 2 image(s) but 1 <image> placeholder(s)"),
        ("text-only-placeholder", "image count mismatch: 0 image(s) but 1 <image> placeholder(s)"),
        ("roles", "invalid conversation: turn 1: expected from='gpt', got 'human'"),
        ("no-answer", "invalid conversation: "),
        ("missing-video", "missing video: {tmp}/gone.mp4"),
        ("truncated-video", "unreadable video: {tmp}/cut.mp4: "),
        ("corrupt-video", "unreadable video: {tmp}/garbled.mp4: Invalid data found when processing input"),
        ("text-video", "unreadable video: {tmp}/notes.mp4: Invalid data found when processing input"),
        ("empty-folder", "unreadable video: {tmp}/no_frames: a frame folder without image files"),
        ("clip-outside", "clip outside video: [1.5, 2.5] s of {tmp}/ok.mp4, which has 20 frames at 10 fps (2 s)"),
        ("two-videos", "image count mismatch: a video needs one <video> and no <image>; found 2 and 0"),
    ],
)
def test_each_bad_input_raises_a_sample_error_at_its_line(tmp_path, chat_tokenizer, kind, cause):
    meta = write_dataset(tmp_path, [GOOD, hostile_line(tmp_path, kind)])
    dataset = make_dataset(meta, chat_tokenizer)
    dataset[0]  # the good line before it loads
    with pytest.raises(SampleError) as error:
        dataset[1]
    assert str(error.value).startswith(f"{tmp_path / 'ds.jsonl'}:2: {cause.format(tmp=tmp_path)}")


def test_a_sample_whose_images_do_not_fit_is_too_long(tmp_path, chat_tokenizer):
    write_image(tmp_path / "a.png", TILE, TILE)
    meta = write_dataset(tmp_path, [{"image": "a.png", "conversations": chat("<image>What?", "A dot.")}])
    with pytest.raises(SampleError, match=r"ds.jsonl:1: sample too long: .*image block"):
        make_dataset(meta, chat_tokenizer, max_seq_length=40)[0]


def test_a_sample_truncated_before_its_answer_is_too_long(tmp_path, chat_tokenizer):
    meta = write_dataset(tmp_path, [GOOD])
    with pytest.raises(SampleError, match=r"ds.jsonl:1: sample too long: no answer token within the first 40"):
        make_dataset(meta, chat_tokenizer, max_seq_length=40)[0]


LONG = {"conversations": chat("What colour is it?", "Black and white. " * 50)}  # 490 tokens, GOOD 195


def test_a_sample_over_the_limit_is_trained_truncated_and_logged_once_per_line(tmp_path, chat_tokenizer, caplog):
    meta = write_dataset(tmp_path, [GOOD, LONG], repeat_time=2)
    dataset = make_dataset(meta, chat_tokenizer, max_seq_length=300)
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        samples = [dataset[i] for i in (1, 3, 1)]  # line 2, its repeat, line 2 again
    assert [sorted(sample) for sample in samples] == [["attention_mask", "image_flags", "input_ids", "labels",
                                                       "pixel_values"]] * 3
    assert all(len(sample["input_ids"]) == 300 for sample in samples)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning == (f"{tmp_path / 'ds.jsonl'}:2: sample truncated: 490 tokens, 190 over the limit of 300 "
                       "(189 answer tokens lost); trained on its first 300 tokens, as the official trainer does")
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        assert dataset.skip_report() == {"sample truncated": 1}
    assert caplog.records[-1].getMessage() == "trained on 1 samples truncated to 300 tokens (each logged with its line)"


def test_a_sample_certainly_over_twice_the_limit_is_refused_not_truncated(tmp_path, chat_tokenizer):
    # 8,500 bytes of text; no token of chat_tokenizer stands for more than 13 (its longest: "<|endoftext|>").
    far_too_long = {"conversations": chat("q", "Black and white. " * 500)}
    dataset = make_dataset(write_dataset(tmp_path, [GOOD, far_too_long]), chat_tokenizer, max_seq_length=300)
    with pytest.raises(SampleError) as error:
        dataset[1]
    assert str(error.value) == (
        f"{tmp_path / 'ds.jsonl'}:2: sample too long: 8500 bytes of text make at least 654 tokens (no token stands "
        "for more than 13 bytes), over twice the limit of 300: refused rather than truncated, which would drop most "
        "of it; shorten or split it"
    )


def test_a_10_mb_line_is_refused_at_once_not_tokenized(tmp_path, chat_tokenizer):
    meta = write_dataset(tmp_path, [GOOD, {"conversations": chat("Describe it.", "A cat on a mat. " * 625_000)}])
    dataset = make_dataset(meta, chat_tokenizer, max_seq_length=2048)
    start = time.perf_counter()
    with pytest.raises(SampleError, match="ds.jsonl:2: sample too long: 10000011 bytes of text"):
        dataset[1]
    assert time.perf_counter() - start < 1  # tokenizing it all: 10 s and 2 GB here


def test_a_template_that_does_not_fit_the_tokenizer_is_a_tokenization_mismatch(tmp_path, chat_tokenizer):
    meta = write_dataset(tmp_path, [GOOD])
    with pytest.raises(SampleError, match=r"ds.jsonl:1: tokenization mismatch: template 'internlm2-chat'"):
        make_dataset(meta, chat_tokenizer, template="internlm2-chat")[0]


# --- skipping ---------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_meta(tmp_path):
    """Lines 1 and 4 good; 2, 3 and 5 bad."""
    records = [
        {"conversations": chat("q", "zero")},
        hostile_line(tmp_path, "missing"),
        hostile_line(tmp_path, "malformed"),
        {"conversations": chat("q", "three")},
        hostile_line(tmp_path, "two-placeholders"),
    ]
    return write_dataset(tmp_path, records)


def test_skipping_moves_to_the_next_good_sample_and_counts_causes(mixed_meta, chat_tokenizer, caplog):
    dataset = make_dataset(mixed_meta, chat_tokenizer, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        answers = [learned_texts(chat_tokenizer, dataset[i]["labels"]) for i in range(5)]
    assert answers == [["zero<|im_end|>"]] + [["three<|im_end|>"]] * 3 + [["zero<|im_end|>"]]  # the last wraps
    annotation = mixed_meta.parent / "ds.jsonl"
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        f"skipping bad sample {annotation}:2: missing image: {mixed_meta.parent / 'nope.png'}",
        f"skipping bad sample {annotation}:3: malformed JSON: Expecting value at column 20",
        f"skipping bad sample {annotation}:5: image count mismatch: 1 image(s) but 2 <image> placeholder(s)",
    ]  # each bad line reported once, however often it is skipped
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        report = dataset.skip_report()
    assert report == {"malformed JSON": 1, "missing image": 1, "image count mismatch": 1}
    assert "skipped 3 bad samples" in caplog.records[-1].getMessage()


def test_without_skipping_a_bad_sample_stops(mixed_meta, chat_tokenizer):
    dataset = make_dataset(mixed_meta, chat_tokenizer)
    with pytest.raises(SampleError, match="ds.jsonl:2: missing image"):
        dataset[1]
    assert dataset.skip_report() == {}


def test_skip_counts_from_dataloader_workers_reach_the_main_process(mixed_meta, chat_tokenizer):
    dataset = make_dataset(mixed_meta, chat_tokenizer, skip_bad_samples=True)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=Collator(chat_tokenizer.pad_token_id))
    assert len(list(loader)) == 5
    assert dataset.skip_report() == {"malformed JSON": 1, "missing image": 1, "image count mismatch": 1}


def test_truncations_seen_in_dataloader_workers_reach_the_main_process(tmp_path, chat_tokenizer):
    dataset = make_dataset(write_dataset(tmp_path, [LONG, GOOD, LONG, GOOD]), chat_tokenizer, max_seq_length=300)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=Collator(chat_tokenizer.pad_token_id))
    assert len(list(loader)) == 4
    assert dataset.skip_report() == {"sample truncated": 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_with_no_good_sample_is_one_user_error_even_when_skipping(tmp_path, chat_tokenizer, workers):
    first = write_dataset(tmp_path, [hostile_line(tmp_path, "missing")], name="one")
    meta = write_dataset(tmp_path, [hostile_line(tmp_path, "roles"), hostile_line(tmp_path, "malformed")] * 2,
                         name="two", meta=json.loads(first.read_text()), repeat_time=0.5)  # lines 1 and 2 used
    dataset = make_dataset(meta, chat_tokenizer, skip_bad_samples=True)
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=Collator(chat_tokenizer.pad_token_id))
    with pytest.raises(ValueError) as error:
        next(iter(loader))
    message = (f"{meta}: nothing to train on: all 3 annotation lines are bad (malformed JSON: 1, missing image: 1, "
               f"invalid conversation: 1); the first: {tmp_path / 'one.jsonl'}:1: missing image")
    if workers:  # torch re-raises a worker's error as "Caught ValueError in DataLoader worker ...", traceback and all
        assert type(error.value) is ValueError and str(error.value).rstrip().endswith(f"ValueError: {message}")
    else:
        assert type(error.value) is ValueError and str(error.value) == message


def test_lengths_for_grouping_take_each_lines_length_field_else_estimate_from_its_text(tmp_path, chat_tokenizer):
    answer = "red " * 40  # 160 bytes of text in the answer
    records = [{"conversations": chat("Colour?", "red"), "length": 777},
               {"conversations": chat("Colour?", answer)},
               {"image": "a.png", "conversations": chat("Colour?", answer)}]
    write_image(tmp_path / "a.png", 56, 56)
    dataset = make_dataset(write_dataset(tmp_path, records, root=str(tmp_path), repeat_time=2), chat_tokenizer)
    text = (len("Colour?") + len(answer)) // 4
    image = NUM_IMAGE_TOKEN * (SETTINGS["max_dynamic_patch"] + int(SETTINGS["use_thumbnail"]))
    assert dataset.lengths() == [777, text, text + image] * 2


def test_pad2square_centres_an_image_on_the_mean_colour_unless_augmenting(tmp_path, chat_tokenizer):
    from internvl.data.tiling import NORMALIZATIONS

    Image.new("RGB", (56, 28), (255, 0, 0)).save(tmp_path / "wide.png")
    records = [{"image": "wide.png", "conversations": chat("<image>\nColour?", "red")}]
    meta = write_dataset(tmp_path, records, root=str(tmp_path))
    padded = make_dataset(meta, chat_tokenizer, dynamic_image_size=False, pad2square=True)[0]["pixel_values"][0]
    plain = make_dataset(meta, chat_tokenizer, dynamic_image_size=False)[0]["pixel_values"][0]
    mean, std = (torch.tensor(values).view(3, 1) for values in NORMALIZATIONS["imagenet"])
    background = (torch.tensor([int(v * 255) for v in NORMALIZATIONS["imagenet"][0]]).view(3, 1) / 255 - mean) / std
    torch.testing.assert_close(padded[:, 0, :], background.expand(3, 56), atol=1e-6, rtol=0)  # the top row: padding
    torch.testing.assert_close(plain[:, 0, :], ((torch.tensor([1.0, 0, 0]).view(3, 1) - mean) / std).expand(3, 56),
                               atol=1e-6, rtol=0)
    augmented = write_dataset(tmp_path / "aug", records, root=str(tmp_path), data_augment=True)
    assert not torch.allclose(make_dataset(augmented, chat_tokenizer, dynamic_image_size=False, pad2square=True)[0][
        "pixel_values"][0][:, 0, :], background.expand(3, 56), atol=0.05)


@pytest.mark.parametrize("normalize_type", ["imagenet", "clip", "siglip"])
def test_normalize_type_picks_the_official_mean_and_std(tmp_path, chat_tokenizer, normalize_type):
    from internvl.data.tiling import NORMALIZATIONS

    Image.new("RGB", (56, 56), (255, 255, 255)).save(tmp_path / "a.png")
    meta = write_dataset(tmp_path, [{"image": "a.png", "conversations": chat("Colour?", "white")}],
                         root=str(tmp_path))
    tile = make_dataset(meta, chat_tokenizer, normalize_type=normalize_type)[0]["pixel_values"][0]
    mean, std = NORMALIZATIONS[normalize_type]
    assert tile[:, 0, 0].tolist() == pytest.approx([(1 - m) / s for m, s in zip(mean, std)], abs=1e-6)
