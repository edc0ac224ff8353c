"""A synthetic image-question dataset in InternVL's format: coloured shapes drawn with PIL.

Each image is one shape of one colour on a light background, at a random place and size. Questions ask for the
colour or the shape, in English (what the demo's base model learns first) or in French (the new skill LoRA
teaches). Written as the official layout: a meta JSON, one JSONL per dataset, images under `root`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
FRENCH = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune"}
SHAPES = ("circle", "square", "triangle")

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "french": "Quelle est la couleur de la forme?",
}


@dataclass(frozen=True)
class ShapeSample:
    """One drawn image and what it shows."""

    colour: str
    shape: str

    def answer(self, task: str) -> str:
        """The right answer to the question of `task`."""
        return {"colour": self.colour, "shape": self.shape, "french": FRENCH[self.colour]}[task]


def draw(sample: ShapeSample, size: int, rng: random.Random) -> Image.Image:
    """Draw `sample` at a random position and size on a slightly varied light background."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    canvas = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, size - 4)
    left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (left, top, left + extent - 1, top + extent - 1)
    colour = COLOURS[sample.colour]
    if sample.shape == "circle":
        canvas.ellipse(box, fill=colour)
    elif sample.shape == "square":
        canvas.rectangle(box, fill=colour)
    else:
        canvas.polygon([(left + extent // 2, top), (left, top + extent - 1), (left + extent - 1, top + extent - 1)],
                       fill=colour)
    return image


def write_dataset(root: Path, name: str, tasks: tuple[str, ...], count: int, image_size: int, seed: int) -> Path:
    """Write `count` samples asking `tasks` questions under `root/name`; returns the JSONL path."""
    rng = random.Random(seed)
    images = root / name / "images"
    images.mkdir(parents=True, exist_ok=True)
    annotation = root / name / "data.jsonl"
    with annotation.open("w") as lines:
        for index in range(count):
            sample = ShapeSample(rng.choice(list(COLOURS)), rng.choice(SHAPES))
            path = images / f"{index:05d}.png"
            draw(sample, image_size, rng).save(path)
            task = rng.choice(tasks)
            record = {
                "id": index,
                "image": f"images/{path.name}",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTIONS[task]}"},
                    {"from": "gpt", "value": sample.answer(task)},
                ],
            }
            lines.write(json.dumps(record) + "\n")
    return annotation


def write_meta(path: Path, datasets: dict[str, Path]) -> Path:
    """Write the meta JSON naming each dataset's root and annotation file."""
    meta = {
        name: {"root": str(annotation.parent), "annotation": str(annotation), "data_augment": False,
               "repeat_time": 1, "length": len(annotation.read_text().splitlines())}
        for name, annotation in datasets.items()
    }
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_questions(annotation: Path) -> list[tuple[Path, str, str]]:
    """(image path, question, answer) of every line of a dataset written by `write_dataset`."""
    items = []
    for line in annotation.read_text().splitlines():
        record = json.loads(line)
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        items.append((annotation.parent / record["image"], question, record["conversations"][1]["value"]))
    return items
