"""Conversation templates: how the official InternVL chat models lay out a dialogue as one prompt string.

Every template the official chat models use follows the same layout (called "MPT" in the official code):

    system_template.format(system_message) + sep
    + roles[0] + question + sep + roles[1] + answer + sep + ...

and an open turn (message None or "") ends the prompt with the bare role, for the model to continue. InternVL3.5's
GPT-OSS template ("MPT_TWO") ends the last answer with a second separator, `sep2` (`<|return|>`), instead.
The templates differ only in their strings, so each one is a row of plain data below.
"""

from __future__ import annotations

import dataclasses

# The two default system messages of the official templates, verbatim (the models were trained with them).
_INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
_INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_INTERNVL3_5_GPT_OSS_SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)


@dataclasses.dataclass
class Conversation:
    """A template plus the messages of one dialogue; `get_prompt()` renders them as the model expects."""

    name: str
    system_template: str  # "{system_message}" is replaced by system_message
    system_message: str
    roles: tuple[str, str]  # (user role prefix, assistant role prefix)
    sep: str  # ends the system block and every message
    stop_str: str | None = None  # extra text that also ends a generated answer
    sep2: str | None = None  # ends the last message instead of sep, when it is an answer (MPT_TWO)
    answer_header: str = ""  # written by the model before every answer (GPT-OSS's channel), after the role
    messages: list[list[str | None]] = dataclasses.field(default_factory=list)  # [role, message] pairs

    def append_message(self, role: str, message: str | None) -> None:
        """Add a turn; a None (or empty) message leaves the turn open for the model to answer."""
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        """Render the system block and all messages as one prompt string."""
        prompt = self.system_template.format(system_message=self.system_message) + self.sep
        for i, (role, message) in enumerate(self.messages):
            is_answer = role == self.roles[1]
            end = self.sep2 if self.sep2 is not None and is_answer and i == len(self.messages) - 1 else self.sep
            # The official code tests truthiness, so an empty message also leaves the turn open.
            prompt += role + (self.answer_header if is_answer else "") + message + end if message else role
        return prompt

    def copy(self) -> Conversation:
        """An independent copy (messages included) that can be edited freely."""
        return dataclasses.replace(self, messages=[list(turn) for turn in self.messages])

    @property
    def stop_token(self) -> str:
        """The end-of-turn token the model emits after an answer (the last answer's separator without whitespace)."""
        return (self.sep2 or self.sep).strip()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Every string that ends a generated answer: the end-of-turn token, then the template's stop string."""
        return (self.stop_token,) if self.stop_str is None else (self.stop_token, self.stop_str)


_TEMPLATES: dict[str, Conversation] = {
    template.name: template
    for template in [
        # InternVL 2.5, 3 and 3.5: ChatML with a newline after every <|im_end|>.
        Conversation(
            name="internvl2_5",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_INTERNVL2_5_SYSTEM,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>\n",
        ),
        # InternVL 1.5 / 2 with InternLM2: ChatML without the newline after <|im_end|>.
        Conversation(
            name="internlm2-chat",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_INTERNVL2_SYSTEM,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>",
        ),
        # As internlm2-chat at inference; training tokenizes it without a BOS (see tokenize.py).
        Conversation(
            name="Hermes-2",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_INTERNVL2_SYSTEM,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>",
            stop_str="<|endoftext|>",
        ),
        # InternVL2-4B (Phi-3).
        Conversation(
            name="phi3-chat",
            system_template="<|system|>\n{system_message}",
            system_message=_INTERNVL2_SYSTEM,
            roles=("<|user|>\n", "<|assistant|>\n"),
            sep="<|end|>",
        ),
        # InternVL3.5-GPT-OSS: the harmony format. The model writes each answer's channel header itself, so the
        # assistant role is only "<|start|>assistant" and the header is learned with the answer.
        Conversation(
            name="internvl3_5_gpt_oss",
            system_template="<|start|>system<|message|>{system_message}",
            system_message=_INTERNVL3_5_GPT_OSS_SYSTEM,
            roles=("<|start|>user<|message|>", "<|start|>assistant"),
            sep="<|end|>",
            sep2="<|return|>",
            answer_header="<|channel|>final<|message|>",
        ),
    ]
}

TEMPLATE_NAMES = tuple(_TEMPLATES)


def get_conv_template(name: str) -> Conversation:
    """A fresh, empty conversation for the template `name` (as in a checkpoint's `template` field)."""
    if name not in _TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known templates: {', '.join(TEMPLATE_NAMES)}")
    return _TEMPLATES[name].copy()
