"""Turn one conversation into input ids and labels exactly as the official InternVL training code does.

Each template has its own official preprocessing function, and they differ in details the official models were
trained on (BOS handling, whether the newline after the end-of-turn token is learned, how tokens are counted), so
each is reproduced step by step rather than unified:

    internvl2_5     preprocess_internvl2_5  tokenizes turn by turn and concatenates
    internlm2-chat  preprocess_internlm     tokenizes the whole prompt, then counts tokens of prompt pieces
    Hermes-2        preprocess_mpt          idem, with other counting rules (no BOS)
    phi3-chat       preprocess_phi3         idem, with Phi-3's counting rules
    internvl3_5_gpt_oss  preprocess_internvl3_5_gpt_oss  turn by turn, in GPT-OSS's harmony format

In all of them only the assistant answers and their end-of-turn token are learned; everything else is IGNORE_INDEX.
Where the counted length disagrees with the real one, the official code silently masks the whole sample; we raise
TokenizationMismatch instead, so a wrong tokenizer cannot train on nothing unnoticed. A sample over the length
limit is cut as officially, but the cut is returned (`Truncation`) for the caller to report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from internvl.data.constants import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
)
from internvl.data.templates import Conversation, get_conv_template


class TokenizationMismatch(ValueError):
    """The tokenizer does not split the prompt the way the template's labelling rules assume."""


class SampleTooLong(ValueError):
    """Truncating the sample to the length limit would cut an image block."""


@dataclass(frozen=True)
class Truncation:
    """What cutting a sample to the length limit dropped; the official code cuts without a word."""

    tokens: int  # the sample's length before the cut
    limit: int
    answer_tokens: int  # learned tokens (labels not IGNORE_INDEX) among those dropped

    def __str__(self) -> str:
        lost = f"{self.answer_tokens} answer tokens lost" if self.answer_tokens else "no answer token lost"
        return f"{self.tokens} tokens, {self.tokens - self.limit} over the limit of {self.limit} ({lost})"


def preprocess(
    template_name: str,
    conversations: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    num_image_token_list: Sequence[int],
    *,
    text_only: bool = False,
    max_seq_length: int | None = None,
) -> dict[str, torch.Tensor | Truncation]:
    """Tokenize one conversation: {"input_ids", "labels", "attention_mask"}, each a LongTensor [T].

    `conversations` is the list of {"from", "value"} turns of one sample: an optional leading "system" turn (it
    replaces the template's system message), then "human" and "gpt" turns alternating, ending with "gpt".
    Unless `text_only`, the i-th `<image>` becomes `<img>` + `<IMG_CONTEXT>` * num_image_token_list[i] + `</img>`.
    The sample is truncated to `max_seq_length` (default: tokenizer.model_max_length), never through an image;
    a truncated sample also holds "truncation", a `Truncation` saying what was cut (the collator ignores it).
    """
    conv = get_conv_template(template_name)
    system, turns = _split_roles(conversations)
    if system is not None:
        conv.system_message = system
    image_blocks = [] if text_only else [_image_block(n) for n in num_image_token_list]
    if image_blocks:
        _check_image_tokens(tokenizer)

    input_ids, labels = _LABELLERS[template_name](conv, turns, tokenizer, image_blocks)

    limit = max_seq_length or tokenizer.model_max_length
    truncation = None
    if len(input_ids) > limit:
        if image_blocks and _has_image_tokens(input_ids[limit:], tokenizer):
            raise SampleTooLong(
                f"sample has {len(input_ids)} tokens, more than the limit of {limit}, and truncating it would cut "
                "through an image block; raise max_seq_length or use fewer image tiles"
            )
        truncation = Truncation(len(input_ids), limit, int(labels[limit:].ne(IGNORE_INDEX).sum()))
        input_ids, labels = input_ids[:limit], labels[:limit]
    sample = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    if truncation is not None:
        sample["truncation"] = truncation
    return sample


def longest_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """At least the bytes of text any one token stands for: the UTF-8 length of the longest vocabulary entry.

    An entry never takes fewer bytes than the text it stands for: byte-level BPE writes each byte as one character
    of one or two bytes, sentencepiece a space as the three-byte "▁" and a fallback byte as "<0x..>". So a text
    of `text_bytes` B is at least B / longest_token_bytes tokens.
    """
    return max(len(token.encode()) for token in tokenizer.get_vocab())


def text_bytes(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The UTF-8 length of text as the tokenizer splits it: after its normalizer (Qwen2's NFC may shorten it).

    A tokenizer without `backend_tokenizer` (our InternLM2 sentencepiece) is taken as not normalizing, which
    InternLM2's tokenizer.model does not (identity rule, whitespace kept).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = None if backend is None else backend.normalizer
    return len((text if normalizer is None else normalizer.normalize_str(text)).encode())


def _split_roles(conversations: Sequence[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """Separate the optional system turn; check that human and gpt turns alternate and the last one is gpt."""
    turns = list(conversations)
    system = None
    if turns and turns[0].get("from") == "system":
        system, turns = turns[0]["value"], turns[1:]
    offset = len(conversations) - len(turns)
    if not turns:
        raise ValueError("conversation has no human/gpt turns")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise ValueError(f"turn {i + offset}: expected from={expected!r}, got {turn.get('from')!r}")
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            # The official templates render an empty message as an open turn, which breaks the labelling.
            raise ValueError(f"turn {i + offset}: value is empty or not a string")
    if len(turns) % 2 == 1:
        raise ValueError(f"turn {len(conversations) - 1}: the conversation must end with a gpt turn")
    return system, turns


def _image_block(num_tokens: int) -> str:
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * num_tokens + IMG_END_TOKEN


def _insert_images(text: str, blocks: list[str]) -> tuple[str, list[str]]:
    """Replace the `<image>` placeholders of text, left to right, by blocks; return the text and the unused blocks."""
    while blocks and IMAGE_PLACEHOLDER in text:
        text = text.replace(IMAGE_PLACEHOLDER, blocks[0], 1)
        blocks = blocks[1:]
    return text, blocks


def _check_all_inserted(unused: list[str], total: int) -> None:
    if unused:
        raise ValueError(f"{total} images but only {total - len(unused)} {IMAGE_PLACEHOLDER} placeholders")


def _check_image_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    for token in (IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token; load it with internvl.data.tokenizer.load_tokenizer")


def _has_image_tokens(ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> bool:
    image_ids = tokenizer.convert_tokens_to_ids([IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN])
    return bool(torch.isin(ids, torch.tensor(image_ids)).any())


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = True) -> list[int]:
    # Not verbose: transformers would warn of "indexing errors" for a text over model_max_length, which we truncate.
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Token count of text encoded on its own, BOS included when the tokenizer adds one (the official counting)."""
    return len(_encode(tokenizer, text))


def _mismatch(conv: Conversation, tokenizer: PreTrainedTokenizerBase, detail: str) -> TokenizationMismatch:
    return TokenizationMismatch(
        f"template {conv.name!r} does not fit tokenizer {tokenizer.name_or_path or '?'!r} "
        f"({type(tokenizer).__name__}): {detail}; the official code would silently mask this sample"
    )


def _check_total(conv: Conversation, tokenizer: PreTrainedTokenizerBase, counted: int, ids: torch.Tensor) -> None:
    """The official consistency check: counted tokens must equal the sample's non-pad tokens."""
    pad_id = tokenizer.pad_token_id
    # The official code counts non-pad tokens, so a pad token inside the text is a mismatch there too.
    total = len(ids) if pad_id is None else int(ids.ne(pad_id).sum())
    if counted != total:
        raise _mismatch(conv, tokenizer, f"labels cover {counted} tokens but the sample has {total}")


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding prepends BOS (InternLM2 does, Qwen does not)."""
    ids = _encode(tokenizer, "")
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _label_turn_by_turn(conv, turns, tokenizer, image_blocks, unlearned_tail: int = 0):
    """Each turn tokenized alone and concatenated; an answer learns all but its role prefix and the last
    `unlearned_tail` tokens (its answer header included). The last answer ends with `conv.sep2` where the template
    has one."""
    pieces = [conv.system_template.format(system_message=conv.system_message) + conv.sep]
    learned = [False]
    unused = image_blocks
    for i, turn in enumerate(turns):
        is_answer = turn["from"] == "gpt"
        value = turn["value"]
        if not is_answer:  # images go into the user turns only
            value, unused = _insert_images(value, unused)
        end = conv.sep2 if conv.sep2 is not None and i == len(turns) - 1 else conv.sep
        header = conv.answer_header if is_answer else ""
        pieces.append(conv.roles[1 if is_answer else 0] + header + value + end)
        learned.append(is_answer)
    _check_all_inserted(unused, len(image_blocks))

    # The official code reads the attribute add_bos_token; we ask the tokenizer what it does, which agrees for the
    # official tokenizers. Pieces are encoded without special tokens, so a BOS-adding tokenizer gets one BOS, first.
    if _adds_bos(tokenizer):
        pieces[0] = tokenizer.bos_token + pieces[0]
    role_len = len(_encode(tokenizer, conv.roles[1], add_special_tokens=False))  # e.g. "<|im_start|>assistant\n"

    input_ids, labels = [], []
    for piece, is_answer in zip(pieces, learned):
        ids = torch.tensor(_encode(tokenizer, piece, add_special_tokens=False), dtype=torch.long)
        target = ids.clone() if is_answer else torch.full_like(ids, IGNORE_INDEX)
        if is_answer:
            target[:role_len] = IGNORE_INDEX
            if unlearned_tail:
                target[-unlearned_tail:] = IGNORE_INDEX
        input_ids.append(ids)
        labels.append(target)
    return torch.cat(input_ids), torch.cat(labels)


def _label_internvl2_5(conv, turns, tokenizer, image_blocks):
    """preprocess_internvl2_5: turn by turn; the answer's role prefix and the newline after <|im_end|> not learned."""
    return _label_turn_by_turn(conv, turns, tokenizer, image_blocks, unlearned_tail=1)


def _label_internvl3_5_gpt_oss(conv, turns, tokenizer, image_blocks):
    """preprocess_internvl3_5_gpt_oss: turn by turn; only "<|start|>assistant" of an answer is not learned, so its
    channel header, text and end token are. Earlier answers end with <|end|>, the last with <|return|> (the
    official code picks the end token from a stale loop variable, so single-image samples end in <|end|> and
    text-only ones fail; this is the rule its template states)."""
    return _label_turn_by_turn(conv, turns, tokenizer, image_blocks)


def _prompt_ids(conv, turns, tokenizer, image_blocks, strip=False):
    """Render the whole prompt (images inserted) and encode it; the start of the three token-counting labellers."""
    for turn in turns:
        value = turn["value"].strip() if strip else turn["value"]
        conv.append_message(conv.roles[1 if turn["from"] == "gpt" else 0], value)
    prompt, unused = _insert_images(conv.get_prompt(), image_blocks)
    _check_all_inserted(unused, len(image_blocks))
    ids = torch.tensor(_encode(tokenizer, prompt), dtype=torch.long)
    return prompt, ids, ids.clone()


def _rounds(prompt: str, sep: str) -> list[str]:
    """Split the prompt at the separators into (system + first question + answer), then (question + answer)s."""
    parts = prompt.split(sep)
    return [sep.join(parts[:3])] + [sep.join(parts[i : i + 2]) for i in range(3, len(parts), 2)]


def _label_internlm(conv, turns, tokenizer, image_blocks):
    """preprocess_internlm: values stripped; pieces counted with the BOS the tokenizer adds removed."""
    prompt, input_ids, labels = _prompt_ids(conv, turns, tokenizer, image_blocks, strip=True)
    question_role, answer_role = conv.roles
    cur = 1  # the BOS
    labels[:cur] = IGNORE_INDEX
    parts = prompt.split(answer_role)  # [system + question 1, answer 1 + question 2, ..., last answer]
    n = _count(tokenizer, parts[0] + answer_role) - 1
    labels[cur : cur + n] = IGNORE_INDEX
    cur += n
    for part in parts[1:-1]:
        answer_and_question = part.split(question_role)
        if len(answer_and_question) != 2:
            raise _mismatch(conv, tokenizer, f"a message contains the role marker {question_role!r}")
        answer, question = answer_and_question
        cur += _count(tokenizer, answer) - 1
        n = _count(tokenizer, question_role + question + answer_role) - 1
        labels[cur : cur + n] = IGNORE_INDEX
        cur += n
    cur += _count(tokenizer, parts[-1]) - 1
    labels[cur:] = IGNORE_INDEX
    _check_total(conv, tokenizer, cur, input_ids)
    return input_ids, labels


def _label_mpt(conv, turns, tokenizer, image_blocks):
    """preprocess_mpt (Hermes-2): no BOS; each round counts one extra token for the separator split() removed."""
    prompt, input_ids, labels = _prompt_ids(conv, turns, tokenizer, image_blocks)
    answer_start = conv.sep + conv.roles[1]  # "<|im_end|><|im_start|>assistant\n"
    cur = 0
    for round_text in _rounds(prompt, conv.sep):
        if round_text == "":
            break
        round_len = _count(tokenizer, round_text) + 1
        parts = round_text.split(answer_start)
        if len(parts) != 2:
            break
        n = _count(tokenizer, parts[0] + answer_start)
        labels[cur : cur + n] = IGNORE_INDEX
        cur += round_len
    labels[cur:] = IGNORE_INDEX
    _check_total(conv, tokenizer, cur, input_ids)
    return input_ids, labels


def _label_phi3(conv, turns, tokenizer, image_blocks):
    """preprocess_phi3: <|endoftext|> never learned; counts tuned to Phi-3's slow tokenizer (see below)."""
    prompt, input_ids, labels = _prompt_ids(conv, turns, tokenizer, image_blocks)
    answer_start = conv.sep + conv.roles[1]  # "<|end|><|assistant|>\n"
    cur = 1  # the BOS
    labels[:cur] = IGNORE_INDEX
    endoftext_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if endoftext_id is not None:
        labels[labels == endoftext_id] = IGNORE_INDEX
    # Phi-3's slow tokenizer puts a "▁" token between the BOS and a text's leading role token. The official counts
    # assume it: the first round keeps it (it is in the whole prompt too), later rounds drop it along with the BOS.
    for i, round_text in enumerate(_rounds(prompt, conv.sep)):
        if round_text == "":
            break
        round_len = _count(tokenizer, round_text) - (0 if i == 0 else 1)
        parts = round_text.split(answer_start)
        if len(parts) != 2:
            break
        n = _count(tokenizer, parts[0] + answer_start) - (1 if i == 0 else 2)
        labels[cur : cur + n] = IGNORE_INDEX
        cur += round_len
    labels[cur:] = IGNORE_INDEX
    _check_total(conv, tokenizer, cur, input_ids)
    return input_ids, labels


_LABELLERS = {
    "internvl2_5": _label_internvl2_5,
    "internlm2-chat": _label_internlm,
    "Hermes-2": _label_mpt,
    "phi3-chat": _label_phi3,
    "internvl3_5_gpt_oss": _label_internvl3_5_gpt_oss,
}
