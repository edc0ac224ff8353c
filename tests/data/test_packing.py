"""Sample packing: the greedy rule, and a stream that reads every sample once per pass, split among readers."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from internvl.data.collate import Collator
from internvl.data.dataset import InternVLDataset, SampleBuilder
from internvl.data.packing import GreedyPacker, PackedDataset
from tests.data.builders import chat, write_dataset, write_image


def token_sample(tokens: int, tiles: int = 0, tag: int = 0) -> dict:
    sample = {"input_ids": torch.full((tokens,), tag), "labels": torch.full((tokens,), tag)}
    if tiles:
        sample["pixel_values"] = torch.zeros(tiles, 3, 4, 4)
    return sample


def sizes(packs) -> list[list[int]]:
    return [[len(sample["input_ids"]) for sample in pack] for pack in packs]


def test_a_sample_goes_to_the_fullest_open_pack_it_fits_and_full_packs_leave_at_once():
    packer = GreedyPacker(max_tokens=20, max_tiles=4, max_open=3)
    assert packer.add(token_sample(2)) == [] and packer.add(token_sample(10)) == []  # one pack of 12
    assert packer.add(token_sample(10)) == []  # does not fit beside them: a second pack
    # Fits both; the fullest takes it, and with 1 token left, fewer than the smallest sample's 2, it is full.
    assert sizes(packer.add(token_sample(7))) == [[2, 10, 7]]
    assert sizes(packer.add(token_sample(1, tiles=3))) == [[10, 1]]  # 1 + 3 tiles: full by tiles
    assert packer.flush() == [] and packer.open == []


def test_the_oldest_pack_leaves_when_too_many_are_open():
    packer = GreedyPacker(max_tokens=30, max_tiles=3, max_open=2)
    assert packer.add(token_sample(2)) == [] and packer.add(token_sample(20)) == []  # one pack of 22
    assert packer.add(token_sample(20)) == []  # a second
    assert sizes(packer.add(token_sample(20))) == [[2, 20]]  # a third: the oldest leaves
    assert sizes(packer.add(token_sample(1, tiles=3))) == [[1]]  # its 3 tiles fit no open pack, and fill one
    assert sizes(packer.flush()) == [[20], [20]]


def shapes_dataset(tmp_path, lines: int, max_seq_length: int = 256) -> InternVLDataset:
    from internvl.tiny import tiny_tokenizer

    write_image(tmp_path / "images" / "red.png", 56, 28)
    records = []
    for i in range(lines):
        record = {"conversations": chat(f"Question {i}?", "word " * (i % 7 + 1))}
        if i % 3:
            record["image"] = "red.png"
        records.append(record)
    meta = write_dataset(tmp_path, records, root=str(tmp_path / "images"))
    builder = SampleBuilder(tiny_tokenizer(), template_name="internvl2_5", num_image_token=4, image_size=28,
                            dynamic_image_size=True, max_dynamic_patch=2, use_thumbnail=True,
                            max_seq_length=max_seq_length)
    return InternVLDataset(meta, builder)


def read_packs(dataset: PackedDataset, workers: int, limit: int | None = None) -> list[list[dict]]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    packs = []
    for pack in loader:
        packs.append(pack)
        if limit and len(packs) == limit:
            break
    return packs


def test_without_replacement_every_sample_is_packed_once_within_the_limits_whatever_the_workers(tmp_path):
    samples = shapes_dataset(tmp_path, 30)
    streams = {}
    for workers in (0, 2):
        dataset = PackedDataset(samples, max_packed_tokens=200, num_images_expected=10, max_buffer_size=3,
                                replacement=False, seed=3)
        packs = read_packs(dataset, workers)
        streams[workers] = packs
        assert all(sum(len(s["input_ids"]) for s in pack) <= 200 for pack in packs)
        assert all(sum(len(s["pixel_values"]) if "pixel_values" in s else 1 for s in pack) <= 10 for pack in packs)
        rows = sorted(tuple(s["input_ids"].tolist()) for pack in packs for s in pack)
        assert rows == sorted(tuple(samples[i]["input_ids"].tolist()) for i in range(len(samples)))
        assert len(packs) < len(samples) / 2  # packing packs: fewer rows than half the samples
    again = read_packs(PackedDataset(samples, max_packed_tokens=200, num_images_expected=10, max_buffer_size=3,
                                     replacement=False, seed=3), 2)
    assert sizes(again) == sizes(streams[2])  # the same seed and workers: the same packs


def test_with_replacement_the_stream_goes_on_reshuffled_and_ranks_read_apart(tmp_path):
    samples = shapes_dataset(tmp_path, 12)
    rank_streams = [read_packs(PackedDataset(samples, max_packed_tokens=120, num_images_expected=8,
                                             max_buffer_size=2, seed=0, rank=rank, world_size=2), 0, limit=12)
                    for rank in (0, 1)]
    for packs in rank_streams:
        assert len(packs) == 12  # past the 6 samples of a rank's pass: the stream does not end
    first = {tuple(s["input_ids"].tolist()) for s in rank_streams[0][0] + rank_streams[0][1]}
    second = {tuple(s["input_ids"].tolist()) for s in rank_streams[1][0] + rank_streams[1][1]}
    assert first and second and not first & second  # each rank its own share of a pass


def test_strict_mode_pads_each_pack_to_its_tokens_and_tiles_without_training_on_the_filler():
    collate = Collator(pack=True, image_size=4, strict_tokens=12, strict_tiles=4, loss_reduction="square")
    batch = collate([[token_sample(5, tiles=1, tag=3), token_sample(4, tag=5)], [token_sample(7, tiles=2, tag=6)]])
    assert batch["input_ids"].shape == (1, 24) and batch["pixel_values"].shape[0] == 8
    assert batch["image_flags"].tolist() == [1, 0, 0, 0, 1, 1, 0, 0]  # real tiles, text-only blank, fillers
    assert batch["cu_seqlens"].tolist() == [0, 5, 9, 12, 19, 24]
    fillers = [*range(9, 12), *range(19, 24)]
    assert (batch["labels"][0, fillers] == -100).all() and (batch["loss_weight"][0, fillers] == 0).all()
