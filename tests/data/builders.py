"""Builders of the data tests: a small checkpoint folder, datasets, images, videos and hostile files.

The checkpoint has a byte-level BPE tokenizer with the ChatML special tokens, trained here in milliseconds, and a
config.json of an InternVL2.5-style model with 56-pixel tiles (4 image tokens a tile) so images stay tiny.
Videos are encoded here with PyAV; each frame is one solid colour whose red level tells its index.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from internvl.data.constants import SPECIAL_TOKENS
from internvl.data.tiling import IMAGENET_MEAN, IMAGENET_STD

TILE = 56  # tile side in pixels
PATCH = 14
NUM_IMAGE_TOKEN = int((TILE // PATCH) ** 2 * 0.5**2)  # 4
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is in the image? A red square. Describe the picture. A blue circle on a white background.",
    "What colour is it? Black and white. How many shapes are there? Two shapes, a cat and a dog.",
    "system user assistant You are a helpful assistant. 0 1 2 3 4 5 6 7 8 9",
] * 10
CONFIG = {
    "model_type": "internvl_chat",
    "architectures": ["InternVLChatModel"],
    "template": "internvl2_5",
    "force_image_size": TILE,
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
    "vision_config": {"image_size": TILE, "patch_size": PATCH},
    "llm_config": {"architectures": ["Qwen2ForCausalLM"]},
}


def write_checkpoint(folder: Path, **config_overrides) -> Path:
    """A model folder that `load_tokenizer` and `validate-data` can read: tokenizer files + config.json."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=CHATML, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=4096
    )
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**CONFIG, **config_overrides}))
    return folder


def phi3_style_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that encodes the way Phi-3's slow tokenizer does on texts starting with a role token.

    Phi-3's tokenizer puts a "▁" token between BOS and a leading role token such as <|user|>; the official phi3
    counting relies on that, so this BPE's post-processor adds BOS and one extra token ("Ġ") in front.
    """
    roles = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *roles],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> Ġ $A", special_tokens=[("<s>", bpe.token_to_id("<s>")), ("Ġ", bpe.token_to_id("Ġ"))]
    )
    # pad is not <|endoftext|> here, so that the official rule "never learn <|endoftext|>" shows (with pad ==
    # <|endoftext|> the official length check already rejects samples containing it).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<unk>"
    )
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    return tokenizer


def write_image(path: Path, width: int, height: int, color=(200, 30, 30), fmt: str | None = None) -> Path:
    """A small solid image with a diagonal stripe (so that tiles differ), in the format of its suffix."""
    image = Image.new("RGB", (width, height), color)
    for x in range(min(width, height)):
        image.putpixel((x, x), (0, 0, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


FRAME_STEP = 8  # frame i is red level 8 i: lossy codecs keep that within 3, so the index reads back


def frame_colour(index: int) -> tuple[int, int, int]:
    return (FRAME_STEP * index, 100, 200)


def frame_index(image: Image.Image) -> int:
    """The index of the frame an image was decoded from."""
    return round(np.asarray(image)[..., 0].mean() / FRAME_STEP)


def tile_frames(pixel_values) -> list[int]:
    """The index of the frame each tile of normalised pixel values [tiles, 3, H, W] shows (ImageNet mean/std)."""
    red = (pixel_values[:, 0].mean((1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    return [round(float(level) / FRAME_STEP) for level in red]


def write_video(path: Path, frames: int = 20, fps: int = 10, codec: str = "libx264", size=(TILE, TILE),
                keyframe_every: int = 5, options: dict | None = None) -> Path:
    """A video file of `frames` solid frames (frame i in frame_colour(i)), a keyframe every `keyframe_every`;
    `options` go to FFmpeg's muxer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = keyframe_every
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), frame_colour(i), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())  # what the encoder still holds
    return path


def corrupt_packets(path: Path, packets: range) -> Path:
    """Overwrite the bytes of the video's packets at positions `packets` (in file order) with random ones: a file
    whose container is intact but whose frames there do not decode."""
    with av.open(str(path)) as container:
        spans = [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for position, size in (spans[i] for i in packets):
        data[position:position + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def write_gif(path: Path, frames: int = 20, size=(TILE, TILE)) -> Path:
    """An animated GIF of `frames` solid frames, 100 ms each (10 fps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", size, frame_colour(i)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


def write_frame_folder(folder: Path, frames: int = 12, size=(TILE, TILE)) -> Path:
    """A folder of frames `frame_1.png` ... (frame i in frame_colour(i)), beside a file that is not a frame."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        Image.new("RGB", size, frame_colour(i)).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    return folder


def write_dataset(folder: Path, records: list, name: str = "ds", meta: dict | None = None, **entry) -> Path:
    """A meta JSON (`meta`'s entries + this one) for a JSONL of `records`: dicts, or raw bytes lines as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    annotation = folder / f"{name}.jsonl"
    lines = [record if isinstance(record, bytes) else json.dumps(record).encode() for record in records]
    annotation.write_bytes(b"".join(line + b"\n" for line in lines))
    meta = dict(meta or {})
    meta[name] = {"root": str(folder), "annotation": str(annotation), "data_augment": False, "repeat_time": 1,
                  "length": len(records), **entry}
    meta_path = folder / "meta.json"
    meta_path.write_text(json.dumps(meta))
    return meta_path


def chat(question: str, answer: str, *more: str) -> list[dict[str, str]]:
    """human/gpt turns: question, answer, then further question/answer pairs."""
    texts = [question, answer, *more]
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(texts)]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def truncated_jpeg(size: int = 64) -> bytes:
    """The first half of a noisy JPEG."""
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 60).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


GOOD = {"conversations": chat("What colour is it?", "Black and white.")}  # a valid text-only line


def hostile_line(tmp_path: Path, kind: str):
    """The annotation line (dict, or raw bytes) of one kind of bad sample; writes the files it needs in tmp_path."""
    if kind == "truncated":
        (tmp_path / "t.jpg").write_bytes(truncated_jpeg())
    if kind == "text":
        (tmp_path / "x.jpg").write_text("not an image")
    if kind == "bomb":
        (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    if kind in ("truncated-video", "corrupt-video", "clip-outside"):
        video = write_video(tmp_path / "ok.mp4").read_bytes()  # 20 frames at 10 fps: 2 s
        (tmp_path / "cut.mp4").write_bytes(video[: len(video) // 2])
        (tmp_path / "garbled.mp4").write_bytes(bytes(range(256)) + video[256:])
    if kind == "text-video":
        (tmp_path / "notes.mp4").write_text("not a video\n")
    if kind == "empty-folder":
        (tmp_path / "no_frames").mkdir(exist_ok=True)
        (tmp_path / "no_frames" / "notes.txt").write_text("not a frame")
    write_image(tmp_path / "ok.png", TILE, TILE)
    question = chat("<video>\nWhat happens?", "Colours change.")
    return {
        "malformed": b'{"conversations": [',
        "not-utf8": b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}',
        "missing": {"image": "nope.png", "conversations": chat("<image>What?", "A dot.")},
        "truncated": {"image": "t.jpg", "conversations": chat("<image>What?", "A dot.")},
        "text": {"image": "x.jpg", "conversations": chat("<image>What?", "A dot.")},
        "bomb": {"image": "bomb.png", "conversations": chat("<image>What?", "A dot.")},
        "two-placeholders": {"image": "ok.png", "conversations": chat("<image><image>What?", "A dot.")},
        "too-few-placeholders": {"image": ["ok.png", "ok.png"], "conversations": chat("<image>What?", "Dots.")},
        "text-only-placeholder": {"conversations": chat("<image>What?", "Nothing.")},
        "roles": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi?"}]},
        "no-answer": {"conversations": [{"from": "human", "value": "Hi"}]},
        "missing-video": {"video": "gone.mp4", "conversations": question},
        "truncated-video": {"video": "cut.mp4", "conversations": question},  # its header, at the end, cut off
        "corrupt-video": {"video": "garbled.mp4", "conversations": question},
        "text-video": {"video": "notes.mp4", "conversations": question},
        "empty-folder": {"video": "no_frames", "conversations": question},
        "clip-outside": {"video": "ok.mp4", "clip": [1.5, 2.5], "conversations": question},
        "two-videos": {"video": "ok.mp4", "conversations": chat("<video><video>What?", "Colours.")},
    }[kind]
