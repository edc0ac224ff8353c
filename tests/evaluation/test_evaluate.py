"""One model on held-out data: prompts and losses as training makes them, batched generation as one by one."""

from __future__ import annotations

import json

import pytest
import torch

from internvl.data.collate import pad_batch
from internvl.data.dataset import SampleBuilder
from internvl.data.reading import parse_record
from internvl.evaluation.evaluate import evaluate_model, last_answer_start, sample_builder, select_samples
from internvl.evaluation.settings import EvalSettings
from internvl.synthetic import write_dataset, write_meta
from tests.builders import ARCHITECTURES, build_model

TWO_ROUNDS = {"image": "images/00000.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Et en français?"}, {"from": "gpt", "value": "rouge"},
]}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A meta file of two datasets: image questions of three lengths, and text-only questions."""
    root = tmp_path_factory.mktemp("held_out")
    shapes = write_dataset(root, "shapes", ("colour", "shape", "french"), 6, 56, seed=3)
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": question},
                                                          {"from": "gpt", "value": answer}]}) + "\n"
                            for question, answer in [("Colour of a banana?", "yellow"), ("And of grass?", "green")]))
    return write_meta(root / "meta.json", {"shapes": shapes, "text": text})


def two_round_record(tmp_path):
    write_dataset(tmp_path, "data", ("colour",), 1, 56, seed=0)
    return parse_record(json.dumps(TWO_ROUNDS).encode(), "two.jsonl", 1, str(tmp_path / "data"))


def test_the_prompt_is_the_training_sample_up_to_its_last_answer(tmp_path, tokenizer):
    builder = SampleBuilder(tokenizer, "internvl2_5", num_image_token=4, image_size=56)
    sample = builder.build(two_round_record(tmp_path))
    start = last_answer_start(sample["labels"], answers=2, source="two.jsonl:1")
    prompt = tokenizer.decode(sample["input_ids"][:start])
    assert prompt.endswith("Et en français?<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nred<|im_end|>" in prompt  # the earlier answer, as training saw it
    assert tokenizer.decode(sample["input_ids"][start:]).startswith("rouge<|im_end|>")


def test_a_last_answer_cut_off_by_the_length_limit_is_an_error_naming_the_sample(tmp_path, tokenizer):
    settings = dict(template_name="internvl2_5", num_image_token=4, image_size=56)
    record = two_round_record(tmp_path)
    whole = SampleBuilder(tokenizer, **settings).build(record)
    start = last_answer_start(whole["labels"], answers=2, source="two.jsonl:1")
    cut = SampleBuilder(tokenizer, **settings, max_seq_length=start - 3).build(record)  # in the second question
    with pytest.raises(ValueError, match="two.jsonl:1: the last answer lies beyond the length limit"):
        last_answer_start(cut["labels"], answers=2, source="two.jsonl:1")


def test_the_loss_is_the_training_loss_on_the_answers(held_out, tokenizer):
    model = build_model("Qwen2ForCausalLM", template="internvl2_5")
    results = evaluate_model(model, tokenizer, EvalSettings(str(held_out), max_new_tokens=2))
    builder = sample_builder(model, tokenizer, max_seq_length=8192)
    samples = [builder.build(part.record(index)) for part, index in select_samples(EvalSettings(str(held_out)))]
    with torch.no_grad():  # the Trainer's loss of one batch of every sample: the mean over all answer tokens
        expected = model(**pad_batch(samples, tokenizer.pad_token_id)).loss
    loss = sum(result.loss_sum for result in results) / sum(result.tokens for result in results)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert [result.dataset for result in results] == ["shapes"] * 6 + ["text"] * 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_answers_and_losses_in_left_padded_batches_equal_those_one_by_one(held_out, tokenizer, arch):
    model = build_model(arch, template="internvl2_5", vocab_size=len(tokenizer))

    def evaluate(batch_size: int):
        return evaluate_model(model, tokenizer, EvalSettings(str(held_out), batch_size=batch_size, max_new_tokens=4))

    alone, together = evaluate(1), evaluate(8)  # one batch: image and text-only prompts of several lengths
    assert [result.answer for result in together] == [result.answer for result in alone]
    assert [result.loss_sum for result in together] == pytest.approx([result.loss_sum for result in alone], rel=1e-4)
    assert len({result.answer for result in alone}) > 1  # the prompts differ, so do a random model's answers


def test_max_samples_takes_a_seeded_choice_from_each_dataset_in_file_order(held_out):
    def chosen(**options) -> list[tuple[str, int]]:
        return [(part.spec.name, index) for part, index in select_samples(EvalSettings(str(held_out), **options))]

    every = chosen()
    assert len(every) == 8
    four = chosen(max_samples=4, seed=1)
    assert [name for name, _ in four] == ["shapes"] * 4 + ["text"] * 2  # a dataset smaller than 4 is taken whole
    assert four == sorted(four, key=every.index)
    assert chosen(max_samples=4, seed=1) == four
    assert any(chosen(max_samples=4, seed=seed) != four for seed in range(2, 6))
