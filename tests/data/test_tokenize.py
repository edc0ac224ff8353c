"""preprocess() produces the official input ids and labels for every template (cases written from the official rules).

Each case checks the whole input (the prompt the official code builds, tokenized) and that the learned labels are
exactly the assistant answers followed by the end-of-turn token, nothing else.
"""

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from internvl.data.constants import IGNORE_INDEX, SPECIAL_TOKENS
from internvl.data.tokenize import (
    SampleTooLong,
    TokenizationMismatch,
    Truncation,
    longest_token_bytes,
    preprocess,
    text_bytes,
)
from internvl.data.tokenizer import load_tokenizer
from tests.data.builders import phi3_style_tokenizer
from tests.data.test_tokenizer import CORPUS, write_bpe_checkpoint, write_internlm2_checkpoint

SYSTEM_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYSTEM_2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
IMAGE = "<img>" + "<IMG_CONTEXT>" * 3 + "</img>"

TWO_ROUNDS = [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A cat sits on a mat."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "Black and white."},
]
ANSWERS = ["A cat sits on a mat.", "Black and white."]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Byte-level BPE with ChatML tokens and no BOS, as Qwen2 / Qwen3 / InternVL2.5-1B use."""
    return load_tokenizer(write_bpe_checkpoint(tmp_path_factory.mktemp("qwen")))


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    """Sentencepiece with BOS, as InternLM2 uses."""
    return load_tokenizer(write_internlm2_checkpoint(tmp_path_factory.mktemp("internlm2")))


@pytest.fixture(scope="module")
def phi3():
    return phi3_style_tokenizer()


@pytest.fixture(scope="module")
def harmony():
    """Byte-level BPE with GPT-OSS's harmony tokens and no BOS, as InternVL3.5-GPT-OSS uses."""
    harmony_tokens = ["<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"]
    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=harmony_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([*CORPUS, "system user assistant final"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|return|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    return tokenizer


def learned_runs(labels: torch.Tensor) -> list[list[int]]:
    """The maximal runs of labels that are not IGNORE_INDEX."""
    runs, current = [], []
    for label in labels.tolist():
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_sample(sample, tokenizer, prompt: str, learned: list[str], bos: list[int] = ()):
    """The sample is exactly [bos] + prompt, and learns exactly the `learned` texts."""
    assert sample["input_ids"].tolist() == [*bos, *encode(tokenizer, prompt)]
    assert learned_runs(sample["labels"]) == [encode(tokenizer, text) for text in learned]
    assert sample["labels"].shape == sample["input_ids"].shape == sample["attention_mask"].shape
    assert sample["attention_mask"].eq(1).all()
    assert sample["input_ids"].dtype == sample["labels"].dtype == torch.long


def test_internvl2_5_without_bos(qwen):
    sample = preprocess("internvl2_5", TWO_ROUNDS, qwen, [3])
    prompt = (
        f"<|im_start|>system\n{SYSTEM_2_5}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}\nWhat is in the image?<|im_end|>\n"
        "<|im_start|>assistant\nA cat sits on a mat.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is it?<|im_end|>\n"
        "<|im_start|>assistant\nBlack and white.<|im_end|>\n"
    )
    # The answer and <|im_end|> are learned; the "\n" after <|im_end|> is not.
    check_sample(sample, qwen, prompt, [answer + "<|im_end|>" for answer in ANSWERS])
    assert qwen.decode(learned_runs(sample["labels"])[0]) == "A cat sits on a mat.<|im_end|>"


def test_internvl2_5_with_bos_puts_one_bos_first(internlm2):
    system = {"from": "system", "value": "Answer briefly."}
    sample = preprocess("internvl2_5", [system, *TWO_ROUNDS], internlm2, [3])
    prompt = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}\nWhat is in the image?<|im_end|>\n"
        "<|im_start|>assistant\nA cat sits on a mat.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is it?<|im_end|>\n"
        "<|im_start|>assistant\nBlack and white.<|im_end|>\n"
    )
    check_sample(sample, internlm2, prompt, [answer + "<|im_end|>" for answer in ANSWERS], bos=[1])
    assert sample["input_ids"].tolist().count(internlm2.bos_token_id) == 1


def test_internlm2_chat_strips_values_and_learns_answers(internlm2):
    turns = [{"from": turn["from"], "value": f"  {turn['value']}\n"} for turn in TWO_ROUNDS]
    sample = preprocess("internlm2-chat", turns, internlm2, [3])
    prompt = (
        f"<|im_start|>system\n{SYSTEM_2}<|im_end|>"
        f"<|im_start|>user\n{IMAGE}\nWhat is in the image?<|im_end|>"
        "<|im_start|>assistant\nA cat sits on a mat.<|im_end|>"
        "<|im_start|>user\nWhat colour is it?<|im_end|>"
        "<|im_start|>assistant\nBlack and white.<|im_end|>"
    )
    check_sample(sample, internlm2, prompt, [answer + "<|im_end|>" for answer in ANSWERS], bos=[1])


def test_hermes_2_learns_answers_without_bos(qwen):
    system = {"from": "system", "value": "Be kind."}
    sample = preprocess("Hermes-2", [system, *TWO_ROUNDS], qwen, [3])
    prompt = (
        "<|im_start|>system\nBe kind.<|im_end|>"
        f"<|im_start|>user\n{IMAGE}\nWhat is in the image?<|im_end|>"
        "<|im_start|>assistant\nA cat sits on a mat.<|im_end|>"
        "<|im_start|>user\nWhat colour is it?<|im_end|>"
        "<|im_start|>assistant\nBlack and white.<|im_end|>"
    )
    check_sample(sample, qwen, prompt, [answer + "<|im_end|>" for answer in ANSWERS])


def test_phi3_learns_answers_and_never_endoftext(phi3):
    turns = [*TWO_ROUNDS[:3], {"from": "gpt", "value": "Black<|endoftext|> and white."}]
    sample = preprocess("phi3-chat", turns, phi3, [3])
    prompt = (
        f"<|system|>\n{SYSTEM_2}<|end|>"
        f"<|user|>\n{IMAGE}\nWhat is in the image?<|end|>"
        "<|assistant|>\nA cat sits on a mat.<|end|>"
        "<|user|>\nWhat colour is it?<|end|>"
        "<|assistant|>\nBlack<|endoftext|> and white.<|end|>"
    )
    bos_and_space = phi3("")["input_ids"]
    assert sample["input_ids"].tolist() == [*bos_and_space, *encode(phi3, prompt)]
    runs = learned_runs(sample["labels"])
    # <|endoftext|> is never learned, even inside an answer.
    assert runs == [encode(phi3, text) for text in ["A cat sits on a mat.<|end|>", "Black", " and white.<|end|>"]]


def test_internvl3_5_gpt_oss_learns_channel_header_answer_and_end_token(harmony):
    system = {"from": "system", "value": "Answer briefly."}
    sample = preprocess("internvl3_5_gpt_oss", [system, *TWO_ROUNDS], harmony, [3])
    prompt = (
        "<|start|>system<|message|>Answer briefly.<|end|>"
        f"<|start|>user<|message|>{IMAGE}\nWhat is in the image?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>A cat sits on a mat.<|end|>"
        "<|start|>user<|message|>What colour is it?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Black and white.<|return|>"
    )
    # Only "<|start|>assistant" of each answer is not learned; the last answer ends with <|return|>, earlier ones
    # with <|end|>.
    check_sample(sample, harmony, prompt, ["<|channel|>final<|message|>A cat sits on a mat.<|end|>",
                                           "<|channel|>final<|message|>Black and white.<|return|>"])


def test_internvl3_5_gpt_oss_text_only_sample_ends_with_return(harmony):
    sample = preprocess("internvl3_5_gpt_oss", TWO_ROUNDS[2:], harmony, [], text_only=True)
    assert harmony.decode(learned_runs(sample["labels"])[-1]) == "<|channel|>final<|message|>Black and white.<|return|>"


def test_single_round_text_only_keeps_image_placeholder(qwen):
    turns = [{"from": "human", "value": "Is <image> a tag?"}, {"from": "gpt", "value": "Yes."}]
    sample = preprocess("Hermes-2", turns, qwen, [256], text_only=True)
    prompt = (
        f"<|im_start|>system\n{SYSTEM_2}<|im_end|>"
        "<|im_start|>user\nIs <image> a tag?<|im_end|>"
        "<|im_start|>assistant\nYes.<|im_end|>"
    )
    check_sample(sample, qwen, prompt, ["Yes.<|im_end|>"])


@pytest.mark.parametrize("template", ["internvl2_5", "Hermes-2"])
def test_images_fill_placeholders_in_order(qwen, template):
    turns = [
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"},
        {"from": "gpt", "value": "No."},
    ]
    ids = preprocess(template, turns, qwen, [2, 5])["input_ids"].tolist()
    start, context = qwen.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>"])
    first, second = [i for i, token in enumerate(ids) if token == start]
    assert ids[first + 1 : first + 4] == [context, context, qwen.convert_tokens_to_ids("</img>")]
    assert ids[second + 1 : second + 7] == [context] * 5 + [qwen.convert_tokens_to_ids("</img>")]


@pytest.mark.parametrize("template", ["internvl2_5", "Hermes-2"])
def test_more_images_than_placeholders_is_refused(qwen, template):
    with pytest.raises(ValueError, match="2 images but only 1"):
        preprocess(template, TWO_ROUNDS, qwen, [3, 3])


def test_mismatch_names_template_tokenizer_and_lengths(qwen):
    # internlm2-chat counts assume a BOS-adding tokenizer; the official code would silently mask this sample.
    with pytest.raises(TokenizationMismatch) as error:
        preprocess("internlm2-chat", TWO_ROUNDS, qwen, [3])
    message = str(error.value)
    assert "'internlm2-chat'" in message and "Qwen2Tokenizer" in message and str(qwen.name_or_path) in message
    total = len(preprocess("Hermes-2", TWO_ROUNDS, qwen, [3])["input_ids"])
    assert f"has {total}" in message


def test_pad_token_inside_the_text_is_a_mismatch_as_officially(qwen):
    # The official check counts non-pad tokens, and Qwen's pad token is <|endoftext|>.
    turns = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Bye<|endoftext|>"}]
    with pytest.raises(TokenizationMismatch):
        preprocess("Hermes-2", turns, qwen, [3])


@pytest.mark.parametrize(
    "turns, message",
    [
        ([{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hi"}], "turn 0"),
        ([{"from": "system", "value": "S"}, {"from": "gpt", "value": "Hi"}], "turn 1"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "turn 1"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}], "turn 2"),
        ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "turn 1"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], "turn 1"),
        ([{"from": "system", "value": "S"}], "no human/gpt"),
    ],
)
def test_roles_out_of_order_name_the_turn(qwen, turns, message):
    with pytest.raises(ValueError, match=message):
        preprocess("internvl2_5", turns, qwen, [], text_only=True)


def test_truncation_keeps_whole_images(qwen):
    full = preprocess("internvl2_5", TWO_ROUNDS, qwen, [3])
    limit = len(full["input_ids"]) - 4
    cut = preprocess("internvl2_5", TWO_ROUNDS, qwen, [3], max_seq_length=limit)
    assert torch.equal(cut["input_ids"], full["input_ids"][:limit])
    assert torch.equal(cut["labels"], full["labels"][:limit])


@pytest.mark.parametrize(  # the last tokens: "... Black and white.<|im_end|>\n", the "\n" not learned
    "cut, learned_lost, lost", [(1, 0, "no answer token lost"), (4, 3, "3 answer tokens lost")]
)
def test_truncation_says_how_many_tokens_and_answer_tokens_it_cut(qwen, cut, learned_lost, lost):
    full = preprocess("internvl2_5", TWO_ROUNDS, qwen, [3])
    assert "truncation" not in full
    tokens = len(full["input_ids"])
    assert int(full["labels"][tokens - cut:].ne(IGNORE_INDEX).sum()) == learned_lost
    truncation = preprocess("internvl2_5", TWO_ROUNDS, qwen, [3], max_seq_length=tokens - cut)["truncation"]
    assert truncation == Truncation(tokens=tokens, limit=tokens - cut, answer_tokens=learned_lost)
    assert str(truncation) == f"{tokens} tokens, {cut} over the limit of {tokens - cut} ({lost})"


def test_truncation_through_an_image_is_refused(qwen):
    full = preprocess("internvl2_5", TWO_ROUNDS, qwen, [3])
    inside_image = full["input_ids"].tolist().index(qwen.convert_tokens_to_ids("<IMG_CONTEXT>")) + 1
    with pytest.raises(SampleTooLong, match=f"{len(full['input_ids'])} tokens.*limit of {inside_image}"):
        preprocess("internvl2_5", TWO_ROUNDS, qwen, [3], max_seq_length=inside_image)


def test_text_bytes_are_counted_after_the_tokenizers_normalizer(qwen, internlm2, phi3):
    decomposed = "e\u0301" * 10  # "é" as e + combining acute: 3 bytes, 2 once composed
    assert text_bytes(qwen, decomposed) == 20  # transformers' Qwen2Tokenizer normalizes to NFC
    assert text_bytes(internlm2, decomposed) == text_bytes(phi3, decomposed) == 30  # no normalizer


@pytest.mark.parametrize("name", ["qwen", "internlm2", "phi3"])
@pytest.mark.parametrize(
    "text",
    [*CORPUS[:3], SYSTEM_2_5, " " * 200, "\n\n\t  " * 30, "e\u0301" * 50, "\u1100\u1161\u11a8" * 40, "<|im_end|>" * 9,
     IMAGE * 5, "\U0001f600" * 20],
    ids=["english", "english-2", "chinese", "system", "spaces", "whitespace", "combining", "jamo", "special", "image",
         "emoji"],
)
def test_a_text_of_b_bytes_is_at_least_b_over_the_longest_token_bytes_tokens(request, name, text):
    tokenizer = request.getfixturevalue(name)
    assert len(encode(tokenizer, text)) * longest_token_bytes(tokenizer) >= text_bytes(tokenizer, text)


def test_tokenizer_model_max_length_is_the_default_limit(tmp_path):
    tokenizer = load_tokenizer(write_bpe_checkpoint(tmp_path / "ckpt"), max_seq_length=40)
    assert len(preprocess("internvl2_5", TWO_ROUNDS, tokenizer, [], text_only=True)["input_ids"]) == 40


def test_unknown_template_is_refused(qwen):
    with pytest.raises(ValueError, match="known templates"):
        preprocess("vicuna_v1.1", TWO_ROUNDS, qwen, [3])


def test_input_conversation_is_not_modified(internlm2):
    turns = [{"from": "human", "value": " <image>\nHi "}, {"from": "gpt", "value": " Bye "}]
    preprocess("internlm2-chat", turns, internlm2, [3])
    assert turns == [{"from": "human", "value": " <image>\nHi "}, {"from": "gpt", "value": " Bye "}]
