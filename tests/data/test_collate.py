"""Collation: padding, image tiles and flags, and packing without cross-sample leakage."""

import pytest
import torch

from internvl.data.collate import Collator, pack_batch, pad_batch
from internvl.data.constants import IGNORE_INDEX
from internvl.data.tokenize import preprocess
from internvl.data.tokenizer import load_tokenizer
from tests.data.test_tokenizer import write_bpe_checkpoint

PAD = 7


def sample(ids, labels, tiles=None, flags=None, size=28):
    """A sample as the dataset yields it; `tiles` tiles of size x size filled with their index + 1."""
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.ones(len(ids))}
    if tiles is not None:
        values = torch.arange(1, tiles + 1, dtype=torch.float16)
        out["pixel_values"] = values.view(-1, 1, 1, 1).expand(-1, 3, size, size)
    if flags is not None:
        out["image_flags"] = torch.tensor(flags)
    return out


def test_pad_batch_pads_right():
    batch = pad_batch([sample([1, 2, 3], [-100, 2, 3]), sample([4, 5, 6, 8, 9], [-100, -100, 6, 8, 9])], PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD, PAD], [4, 5, 6, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, 6, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert all(batch[key].dtype == torch.long for key in ("input_ids", "labels", "attention_mask", "position_ids"))


def test_tiles_are_concatenated_and_text_only_samples_add_a_dummy_tile():
    batch = pad_batch(
        [sample([1], [1], tiles=2), sample([2], [2]), sample([3], [3], tiles=1, flags=[1])], PAD, image_size=448
    )
    pixel_values = batch["pixel_values"]
    assert pixel_values.shape == (4, 3, 28, 28) and pixel_values.dtype == torch.float16  # shaped like the real tiles
    assert pixel_values[:, 0, 0, 0].tolist() == [1, 2, 0, 1]  # sample order kept; the dummy is all zeros
    assert not pixel_values[2].any()
    assert batch["image_flags"].tolist() == [1, 1, 0, 1]


def test_text_only_batch_gets_dummy_tiles_of_image_size():
    batch = pad_batch([sample([1], [1]), sample([2, 3], [2, 3])], PAD, image_size=56)
    assert batch["pixel_values"].shape == (2, 3, 56, 56) and not batch["pixel_values"].any()
    assert batch["image_flags"].tolist() == [0, 0]


def test_pack_batch_restarts_positions_and_blocks_label_leakage():
    samples = [sample([1, 2, 3], [1, 2, 3], tiles=1), sample([4, 5], [4, 5]), sample([6, 8, 9, 10], [-100, 8, 9, 10])]
    batch = pack_batch(samples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 8, 9, 10]]
    assert "attention_mask" not in batch
    # Next-token targets: the last token of a sample never has the next sample's first token as its target.
    targets = batch["labels"][0, 1:]
    for boundary in batch["cu_seqlens"][1:-1].tolist():
        assert targets[boundary - 1] == IGNORE_INDEX
    assert batch["image_flags"].tolist() == [1, 0, 0]
    assert samples[0]["labels"].tolist() == [1, 2, 3]  # the samples themselves are untouched


def test_collator_modes():
    samples = [sample([1, 2], [1, 2]), sample([3], [3])]
    assert Collator(pad_token_id=PAD)(samples)["input_ids"].shape == (2, 2)
    assert Collator(pack=True)(samples)["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError, match="pad_token_id"):
        Collator()


def test_collated_preprocessed_samples_learn_only_the_answers(tmp_path):
    tokenizer = load_tokenizer(write_bpe_checkpoint(tmp_path / "ckpt"))
    conversations = [
        [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
        [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}],
    ]
    first = {**preprocess("internvl2_5", conversations[0], tokenizer, [4]), "pixel_values": torch.rand(1, 3, 28, 28)}
    second = preprocess("internvl2_5", conversations[1], tokenizer, [], text_only=True)
    for batch in (Collator(pad_token_id=tokenizer.pad_token_id)([first, second]), Collator(pack=True)([first, second])):
        learned = batch["labels"][batch["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(learned) == "A cat.<|im_end|>Hello!<|im_end|>"
        assert batch["image_flags"].tolist() == [1, 0]
        context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        assert int((batch["input_ids"] == context_id).sum()) == 4
