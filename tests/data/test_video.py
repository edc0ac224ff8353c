"""Videos: each kind read at the wanted frames only, the official frame-index rules, clips, bad files."""

import numpy as np
import pytest

from internvl.data.errors import SampleError
from internvl.data.video import (
    clip_frames,
    frame_placeholders,
    load_video,
    middle_frame_indices,
    open_video,
    random_frame_indices,
    video_prefix,
)
from tests.data.builders import (
    TILE,
    corrupt_packets,
    frame_index,
    tile_frames,
    write_frame_folder,
    write_gif,
    write_video,
)

KINDS = {
    "mp4": lambda folder: write_video(folder / "v.mp4"),  # H.264
    "webm": lambda folder: write_video(folder / "v.webm", codec="libvpx-vp9"),
    "gif": lambda folder: write_gif(folder / "v.gif"),
    "folder": lambda folder: write_frame_folder(folder / "frames", frames=20),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_gives_the_frames_at_the_indices_asked_in_any_order(tmp_path, kind):
    video = open_video(str(KINDS[kind](tmp_path)))
    assert video.frame_count == 20
    assert video.fps == (None if kind == "folder" else 10)
    indices = [13, 2, 19, 2, 0, 7, 7]
    frames = video.read(indices)
    assert [frame_index(frame) for frame in frames] == indices
    assert all(frame.mode == "RGB" and frame.size == (TILE, TILE) for frame in frames)


def test_a_frame_folder_is_in_natural_order_without_its_other_files(tmp_path):
    folder = write_frame_folder(tmp_path / "frames", frames=12)  # frame_1.png ... frame_12.png, notes.txt
    (folder / ".thumb.png").write_bytes((folder / "frame_1.png").read_bytes())
    video = open_video(str(folder))
    assert [path.rsplit("/", 1)[1] for path in video.files] == [f"frame_{i}.png" for i in range(1, 13)]
    assert [frame_index(frame) for frame in video.read(range(12))] == list(range(12))


def test_reading_decodes_only_from_the_keyframe_before_each_wanted_frame(tmp_path):
    # Keyframes at 0, 10, 20; the packets of frames 12 to 17 are garbage, the container intact.
    path = corrupt_packets(write_video(tmp_path / "v.mp4", frames=30, keyframe_every=10), range(12, 18))
    video = open_video(str(path))
    wanted = [*range(10), *range(20, 30)]
    assert [frame_index(frame) for frame in video.read(wanted)] == wanted  # the garbage was never decoded
    with pytest.raises(SampleError, match=f"unreadable video: {path}: "):
        video.read([15])


# --- the official frame-index rules -----------------------------------------------------------------------------


def test_training_draws_one_frame_in_each_of_count_near_equal_intervals():
    rng = np.random.default_rng(0)
    bounds = [0, 2, 5, 7, 10, 12, 15, 17, 20]  # np.linspace(0, 20, 9) as integers: 8 intervals of 20 frames
    draws = [random_frame_indices(8, range(20), rng) for _ in range(400)]
    for k in range(8):
        drawn = {draw[k] for draw in draws}
        assert drawn == set(range(bounds[k], bounds[k + 1]))  # each frame of its interval, and no other
    assert all(draw == sorted(draw) for draw in draws)


def test_a_video_shorter_than_the_count_gives_each_frame_then_its_last_again():
    rng = np.random.default_rng(0)
    assert random_frame_indices(8, range(5), rng) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert random_frame_indices(4, range(30, 32), rng) == [30, 31, 31, 31]  # a clip's frames, from its first


def test_the_same_generator_state_draws_the_same_frames():
    first, again, other = (random_frame_indices(6, range(100), np.random.default_rng(seed)) for seed in (3, 3, 4))
    assert first == again != other


def test_chat_takes_the_model_cards_segment_middles():
    # get_index(bound, fps, max_frame=19, num_segments): segments of (19 - 0) / 8 frames, int(first + size / 2 +
    # round(size * i)), numpy's round (half to even: round(9.5) == 10).
    assert middle_frame_indices(20, 10.0, 8) == [1, 3, 6, 8, 11, 13, 15, 18]
    # bound (0.5, 1.5) s at 10 fps: frames 5 to 15, segments of 2.5 frames.
    assert middle_frame_indices(20, 10.0, 4, bound=(0.5, 1.5)) == [6, 8, 11, 14]
    assert middle_frame_indices(3, None, 6) == [0, 0, 1, 1, 1, 2]  # fewer frames than segments: repeats
    with pytest.raises(ValueError, match="timestamps"):
        middle_frame_indices(20, None, 4, bound=(0.5, 1.5))


def test_a_clip_covers_the_official_frames_and_must_lie_in_the_video(tmp_path):
    video = open_video(str(write_video(tmp_path / "v.mp4")))  # 20 frames at 10 fps
    assert clip_frames(video, None) == range(20)
    assert clip_frames(video, (0.55, 1.27)) == range(5, 12)  # int(5.5) on, int(7.2) frames
    assert clip_frames(video, (0, 2.0)) == range(20)
    for clip, detail in [((1.5, 2.5), "[1.5, 2.5] s of"), ((0.0, 0.05), "[0, 0.05] s of")]:
        with pytest.raises(SampleError) as error:
            clip_frames(video, clip)
        assert str(error.value) == f"clip outside video: {detail} {video.path}, which has 20 frames at 10 fps (2 s)"
    folder = open_video(str(write_frame_folder(tmp_path / "frames")))
    with pytest.raises(SampleError, match="invalid record: 'clip' needs timestamps, which the frame folder"):
        clip_frames(folder, (0, 1))


# --- bad files --------------------------------------------------------------------------------------------------


def _cut(path, options=None):
    """An MP4 cut after two thirds: the header (at the end unless `movflags faststart`) declares every frame."""
    data = write_video(path, options=options).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.mark.parametrize(
    "write, message",
    [
        (None, "missing video: {path}"),
        (lambda p: p.write_text("not a video\n"), "unreadable video: {path}: Invalid data found when processing input"),
        (lambda p: p.write_bytes(b""), "unreadable video: {path}: Invalid data found when processing input"),
        (_cut, "unreadable video: {path}: "),  # FFmpeg finds no stream, or invalid data, by where the cut falls
        (lambda p: _cut(p, {"movflags": "faststart"}),
         "unreadable video: {path}: truncated: its header declares 20 frames, the file holds "),
        (lambda p: p.mkdir(), "unreadable video: {path}: a frame folder without image files"),
    ],
    ids=["missing", "text", "empty", "truncated", "truncated-after-header", "empty-folder"],
)
def test_bad_videos_raise_their_cause_naming_the_file(tmp_path, write, message):
    path = tmp_path / "v.mp4"
    if write:
        write(path)
    with pytest.raises(SampleError) as error:
        open_video(str(path))
    assert str(error.value).startswith(message.format(path=path))


def test_frames_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    path = str(write_video(tmp_path / "v.mp4"))
    assert open_video(path, max_pixels=TILE * TILE).frame_count == 20
    with pytest.raises(SampleError, match=f"decompression bomb: .*56x56 pixels a frame, more than {TILE * TILE - 1}"):
        open_video(path, max_pixels=TILE * TILE - 1)


# --- chat -------------------------------------------------------------------------------------------------------


def test_load_video_gives_the_segment_middles_one_tile_each_as_the_model_cards(tmp_path):
    pixel_values, counts = load_video(write_video(tmp_path / "v.mp4"), num_segments=8, input_size=TILE)
    assert pixel_values.shape == (8, 3, TILE, TILE) and counts == [1] * 8
    assert tile_frames(pixel_values) == [1, 3, 6, 8, 11, 13, 15, 18]


def test_load_video_tiles_each_frame_up_to_max_num(tmp_path):
    wide = write_video(tmp_path / "wide.mp4", size=(3 * TILE, TILE))  # 3:1 -> 3 tiles + thumbnail
    pixel_values, counts = load_video(wide, num_segments=2, input_size=TILE, max_num=6)
    assert counts == [4, 4] and pixel_values.shape == (8, 3, TILE, TILE)


def test_the_frame_prompts_are_the_official_ones():
    assert frame_placeholders(3) == "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>"  # training
    assert video_prefix(2) == "Frame1: <image>\nFrame2: <image>\n"  # the model cards' chat
