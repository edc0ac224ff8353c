"""Builders of the data tests: a small checkpoint folder, datasets, images and hostile files.

The checkpoint has a byte-level BPE tokenizer with the ChatML special tokens, trained here in milliseconds, and a
config.json of an InternVL2.5-style model with 56-pixel tiles (4 image tokens a tile) so images stay tiny.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from internvl.data.constants import SPECIAL_TOKENS

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
    write_image(tmp_path / "ok.png", TILE, TILE)
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
    }[kind]
