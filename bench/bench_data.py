"""Throughput of the data pipeline on one 6-tile image sample, per stage and end to end.

    python bench/bench_data.py [--samples 64] [--workers 2] [--batch-size 4]

Builds everything it needs in a temporary folder: a 1500x1000 JPEG of noise (3:2, so 3 x 2 tiles + thumbnail at
the official max_dynamic_patch 6), a JSONL of identical lines and the package's tiny BPE tokenizer (ChatML and
image tokens).
Prints the time of each stage (read line, load image, tile, transform, tokenize, collate) for one sample, then
samples per second of InternVLDataset in this process and through a DataLoader with N worker processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader

from internvl.data.collate import Collator
from internvl.data.dataset import InternVLDataset, SampleBuilder
from internvl.data.reading import Annotations, open_image, read_meta
from internvl.data.tiling import dynamic_preprocess, tiles_to_tensor
from internvl.data.tokenize import preprocess
from internvl.synthetic import write_meta
from internvl.tiny import tiny_tokenizer

IMAGE_SIZE = 448
NUM_IMAGE_TOKEN = 256  # 448-pixel tiles, patch 14, downsample 0.5
MAX_DYNAMIC_PATCH = 6
TEMPLATE = "internvl2_5"
QUESTION = "<image>\nDescribe the picture in detail, please."
ANSWER = "A field of coloured noise, evenly spread over the whole picture, with no object in it. " * 4


def write_data(folder: Path, samples: int) -> Path:
    """A meta file whose one dataset has `samples` lines, all on the same noise JPEG."""
    Image.effect_noise((1500, 1000), 64).convert("RGB").save(folder / "noise.jpg", quality=90)
    line = json.dumps({"image": "noise.jpg", "conversations": [
        {"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]})
    (folder / "data.jsonl").write_text((line + "\n") * samples)
    return write_meta(folder / "meta.json", {"bench": folder / "data.jsonl"})


def time_stages(meta: Path, tokenizer, batch_size: int, repeats: int) -> dict[str, float]:
    """Median seconds per sample of each stage, run one after the other as the dataset runs them.

    Medians, so that a busy machine's stalls (other processes taking the cores) do not swamp the figures.
    """
    annotations = Annotations(read_meta(meta)[0])
    collator = Collator(pad_token_id=tokenizer.pad_token_id)
    times = {stage: [] for stage in ["read line", "load image", "tile", "transform", "tokenize", "collate"]}
    for i in range(repeats):
        start = time.perf_counter()
        record = annotations.record(i % len(annotations))
        t1 = time.perf_counter()
        image = open_image(record.images[0])
        t2 = time.perf_counter()
        tiles = dynamic_preprocess(image, 1, MAX_DYNAMIC_PATCH, IMAGE_SIZE, use_thumbnail=True)
        t3 = time.perf_counter()
        pixel_values = tiles_to_tensor(tiles, IMAGE_SIZE)
        t4 = time.perf_counter()
        sample = preprocess(TEMPLATE, record.conversations, tokenizer, [NUM_IMAGE_TOKEN * len(tiles)])
        t5 = time.perf_counter()
        sample["pixel_values"] = pixel_values
        collator([sample] * batch_size)
        end = time.perf_counter()
        for stage, seconds in zip(times, [t1 - start, t2 - t1, t3 - t2, t4 - t3, t5 - t4, (end - t5) / batch_size]):
            times[stage].append(seconds)
    assert len(tiles) == MAX_DYNAMIC_PATCH + 1
    return {stage: statistics.median(seconds) for stage, seconds in times.items()}


def samples_per_second(dataset: InternVLDataset, workers: int, batch_size: int, pad_token_id: int) -> float:
    """End-to-end throughput of a DataLoader over the whole dataset (workers=0: in this process)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=Collator(pad_token_id=pad_token_id))
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    count = sum(len(batch["input_ids"]) for batch in iterator)
    return count / (time.perf_counter() - start)


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="lines in the benchmark dataset")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    tokenizer = tiny_tokenizer(vocab_size=1000)
    with tempfile.TemporaryDirectory() as folder:
        meta = write_data(Path(folder), args.samples)
        stages = time_stages(meta, tokenizer, args.batch_size, repeats=min(args.samples, 32))
        print(f"per sample (1500x1000 JPEG -> {MAX_DYNAMIC_PATCH} tiles + thumbnail of {IMAGE_SIZE} px):")
        for stage, seconds in stages.items():
            print(f"  {stage:<11} {seconds * 1000:8.2f} ms")
        total = sum(stages.values())
        print(f"  {'total':<11} {total * 1000:8.2f} ms  ({1 / total:.1f} samples/s)")

        builder = SampleBuilder(tokenizer, TEMPLATE, NUM_IMAGE_TOKEN, image_size=IMAGE_SIZE, dynamic_image_size=True,
                                use_thumbnail=True, max_dynamic_patch=MAX_DYNAMIC_PATCH)
        dataset = InternVLDataset(meta, builder)
        for workers in sorted({0, args.workers}):
            rate = samples_per_second(dataset, workers, args.batch_size, tokenizer.pad_token_id)
            where = "in this process" if workers == 0 else f"DataLoader, {workers} workers"
            print(f"{where}: {rate:.1f} samples/s")


if __name__ == "__main__":
    main()
