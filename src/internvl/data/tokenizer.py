"""Load the tokenizer of an official InternVL checkpoint without running the checkpoint's Python files.

Two kinds of folder exist:
- `tokenizer.json`, or `vocab.json` + `merges.txt` (Qwen2, Qwen3, LLaMA-3, GPT-OSS families): transformers reads
  them with its own classes.
- `tokenizer.model` with `tokenizer_class: InternLM2Tokenizer` (InternLM2 / InternLM2.5 LLMs): the checkpoint ships
  `tokenization_internlm2.py`, which we never execute; `InternLM2Tokenizer` below encodes and decodes as it does.

Then the InternVL special tokens are added as the official trainer adds them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import sentencepiece as spm
import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from internvl.data.constants import SPECIAL_TOKENS


class InternLM2Tokenizer(PreTrainedTokenizer):
    """The InternLM2 sentencepiece tokenizer, behaving as the official `tokenization_internlm2.py`.

    Encoding: added/special tokens are split out first, the text between them goes through sentencepiece as is;
    a BOS is prepended by default (`add_bos_token=True`), no EOS (`add_eos_token=False`).
    """

    vocab_files_names = {"vocab_file": "./tokenizer.model"}  # the official name, "./" included
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        sp_model_kwargs: dict | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # Loaded before the base class initialises, because that already asks for the vocabulary.
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=self.sp_model_kwargs,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (added tokens not counted)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        """Piece -> id for the sentencepiece vocabulary plus the added tokens."""
        vocab = {self.sp_model.IdToPiece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.IdToPiece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decode pieces; special tokens are kept verbatim, each run of them preceded by a space (official rule)."""
        # The official code inserts a space before every run of special tokens that follows ordinary text (its
        # attempt to drop the first one never matches), and always applies clean_up_tokenization.
        out, pieces, prev_is_special = "", [], False
        special = set(self.all_special_tokens)
        for token in tokens:
            if token in special:
                if not prev_is_special:
                    out += " "
                out += self.sp_model.decode(pieces) + token
                pieces, prev_is_special = [], True
            else:
                pieces.append(token)
                prev_is_special = False
        out += self.sp_model.decode(pieces)
        return self.clean_up_tokenization(out)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        """[BOS] + ids (+ second ids) [+ EOS], following add_bos_token / add_eos_token."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + token_ids_0 + (token_ids_1 or []) + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where build_inputs_with_special_tokens puts BOS/EOS, 0 on the sequence tokens."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        body = [0] * (len(token_ids_0) + len(token_ids_1 or []))
        return [1] * self.add_bos_token + body + [1] * self.add_eos_token

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write tokenizer.model into save_directory."""
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out_file = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file):
            with open(out_file, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out_file,)


def load_tokenizer(path: str | os.PathLike, max_seq_length: int | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder, with InternVL's special tokens added (no checkpoint code is run).

    tokenizer_config.json is honoured (added tokens, model_max_length, padding side); `max_seq_length`, when
    given, replaces model_max_length as in the official trainer.
    """
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    class_name = config.get("tokenizer_class")
    has_bpe_files = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if class_name == "InternLM2Tokenizer" and (path / "tokenizer.model").is_file():
        # add_eos_token=False as the official trainer passes it: an EOS after each prompt would break the labels.
        tokenizer = InternLM2Tokenizer.from_pretrained(path, add_eos_token=False)
    elif class_name and hasattr(transformers, class_name) and ((path / "tokenizer.json").is_file() or has_bpe_files):
        # The class the config names, taken from transformers (its auto_map, i.e. the checkpoint's code, ignored).
        tokenizer = getattr(transformers, class_name).from_pretrained(path)
    elif (path / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        raise ValueError(
            f"{path}: no tokenizer we can read without the checkpoint's code; expected tokenizer.json, "
            "vocab.json + merges.txt with a transformers tokenizer_class, or tokenizer.model with tokenizer_class "
            f"InternLM2Tokenizer (tokenizer_class here: {class_name!r})"
        )
    # Official checkpoints already contain these tokens, so this adds nothing to them.
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    if max_seq_length is not None:
        tokenizer.model_max_length = max_seq_length
    return tokenizer


def resize_embeddings_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Grow the model's input/output embeddings to cover the tokenizer; return how many rows were added.

    New rows start at the mean of the old rows (the official trainer does this for the output embeddings; the
    input embeddings get the same so that new tokens start neutral rather than random). Never shrinks.
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    new_rows = len(tokenizer) - old_rows
    if new_rows <= 0:
        return 0
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        for embedding in embeddings:
            if embedding is not None:
                weight = embedding.weight
                weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)
    return new_rows
