"""Each template renders exactly the prompt of the official conversation.py (cases written out by hand)."""

import pytest

from internvl.data.templates import TEMPLATE_NAMES, get_conv_template

INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


def _two_rounds(name: str) -> str:
    conv = get_conv_template(name)
    conv.append_message(conv.roles[0], "Q1")
    conv.append_message(conv.roles[1], "A1")
    conv.append_message(conv.roles[0], "Q2")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def test_internvl2_5_prompt():
    assert _two_rounds("internvl2_5") == (
        f"<|im_start|>system\n{INTERNVL2_5_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", ["internlm2-chat", "Hermes-2"])
def test_chatml_without_newline_prompt(name):
    assert _two_rounds(name) == (
        f"<|im_start|>system\n{INTERNVL2_SYSTEM}<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|>"
        "<|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_phi3_prompt():
    assert _two_rounds("phi3-chat") == (
        f"<|system|>\n{INTERNVL2_SYSTEM}<|end|>"
        "<|user|>\nQ1<|end|>"
        "<|assistant|>\nA1<|end|>"
        "<|user|>\nQ2<|end|>"
        "<|assistant|>\n"
    )


def test_internvl3_5_gpt_oss_prompt_ends_the_last_answer_with_return_and_opens_with_the_bare_role():
    conv = get_conv_template("internvl3_5_gpt_oss")
    assert conv.system_message.startswith("You are InternVL, a large language model trained by Shanghai AI Laboratory.")
    assert conv.system_message.endswith("Reasoning: low\n\n# Valid channels: final. Channel must be included for "
                                        "every message.")
    conv.system_message = "S"
    for question, answer in (("Q1", "A1"), ("Q2", "A2")):
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], answer)
    assert conv.get_prompt() == (
        "<|start|>system<|message|>S<|end|>"
        "<|start|>user<|message|>Q1<|end|><|start|>assistant<|channel|>final<|message|>A1<|end|>"
        "<|start|>user<|message|>Q2<|end|><|start|>assistant<|channel|>final<|message|>A2<|return|>"
    )
    conv.append_message(conv.roles[0], "Q3")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt().endswith("A2<|end|><|start|>user<|message|>Q3<|end|><|start|>assistant")


def test_system_message_and_roles_are_assignable():
    conv = get_conv_template("internvl2_5")
    conv.system_message = "Be brief."
    conv.append_message(conv.roles[0], "Hi")
    conv.append_message(conv.roles[1], "")  # empty counts as open, as in the official code
    assert conv.get_prompt() == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    conv.roles = ("U: ", "A: ")
    assert conv.roles == ("U: ", "A: ")


def test_get_conv_template_returns_independent_copies():
    first = get_conv_template("internvl2_5")
    first.append_message(first.roles[0], "Hi")
    first.system_message = "changed"
    second = get_conv_template("internvl2_5")
    assert second.messages == [] and second.system_message == INTERNVL2_5_SYSTEM
    clone = first.copy()
    clone.messages[0][1] = "edited"
    assert first.messages[0][1] == "Hi"


@pytest.mark.parametrize(
    "name, stop_token, stop_strings",
    [
        ("internvl2_5", "<|im_end|>", ("<|im_end|>",)),
        ("internlm2-chat", "<|im_end|>", ("<|im_end|>",)),
        ("Hermes-2", "<|im_end|>", ("<|im_end|>", "<|endoftext|>")),
        ("phi3-chat", "<|end|>", ("<|end|>",)),
        ("internvl3_5_gpt_oss", "<|return|>", ("<|return|>",)),
    ],
)
def test_stop_criteria(name, stop_token, stop_strings):
    conv = get_conv_template(name)
    assert conv.stop_token == stop_token
    assert conv.stop_strings == stop_strings


def test_unknown_template_lists_known_ones():
    with pytest.raises(ValueError) as error:
        get_conv_template("vicuna")
    for name in TEMPLATE_NAMES:
        assert name in str(error.value)
