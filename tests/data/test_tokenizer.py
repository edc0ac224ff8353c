"""load_tokenizer reads official checkpoint folders without their code; resize_embeddings_for_tokenizer grows models.

The checkpoint folders are built here: a byte-level BPE (as Qwen2 ships it, both as tokenizer.json and as
vocab.json + merges.txt) and a sentencepiece model declared as InternLM2Tokenizer. test_tokenize.py reuses them.
"""

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from internvl.data.constants import SPECIAL_TOKENS
from internvl.data.tokenizer import InternLM2Tokenizer, load_tokenizer, resize_embeddings_for_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is in the image? A cat sits on a mat.",
    "Describe the picture in detail, please. The colour is black and white; 1234 apples!",
    "你好，世界。书生万象是一个多模态大模型。用户问了一个问题，助手给出回答。",
] * 20
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _added_tokens(vocab: dict[str, int], tokens: list[str]) -> dict:
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    return {str(vocab[token]): {"content": token, **flags} for token in tokens}


def write_bpe_checkpoint(folder: Path, layout: str = "tokenizer.json") -> Path:
    """A Qwen2-style tokenizer folder: byte-level BPE with the ChatML special tokens, no BOS."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=CHATML,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "tokenizer.json":
        bpe.save(str(folder / "tokenizer.json"))
    else:
        bpe.model.save(str(folder))  # vocab.json + merges.txt
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
        "padding_side": "left",
        "added_tokens_decoder": _added_tokens(bpe.get_vocab(), CHATML),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_internlm2_checkpoint(folder: Path) -> Path:
    """An InternLM2-style tokenizer folder: sentencepiece model, tokenizer_class InternLM2Tokenizer, remote code."""
    model = io.BytesIO()
    # Settings of InternLM2's tokenizer.model: no dummy prefix, identity normalisation, byte fallback.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "\n"],
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {token: sp.piece_to_id(token) for token in ["<|im_start|>", "<|im_end|>"]}
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "added_tokens_decoder": _added_tokens(vocab, ["<|im_start|>", "<|im_end|>"]),
        "model_max_length": 32768,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # The checkpoint's own tokenizer code must never run.
    (folder / "tokenization_internlm2.py").write_text("raise RuntimeError('checkpoint code was executed')\n")
    return folder


def _base_size(folder: Path) -> int:
    """Vocabulary size of the folder before InternVL's tokens are added."""
    if (folder / "tokenizer.model").is_file():
        return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    return len(json.loads((folder / "vocab.json").read_text()))


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab+merges"])
def test_bpe_folder_loads_with_special_tokens_added(tmp_path, layout):
    folder = write_bpe_checkpoint(tmp_path / "ckpt", layout)
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == _base_size(folder) + len(SPECIAL_TOKENS)
    assert tokenizer.padding_side == "left" and tokenizer.model_max_length == 4096  # from tokenizer_config.json
    assert tokenizer.pad_token == "<|endoftext|>"
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is in the image?<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS in front
    assert ids.count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 2
    assert tokenizer.decode(ids) == text
    for token in SPECIAL_TOKENS:
        (token_id,) = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert tokenizer.added_tokens_decoder[token_id].special  # never split, skipped when decoding


def test_max_seq_length_overrides_model_max_length(tmp_path):
    tokenizer = load_tokenizer(write_bpe_checkpoint(tmp_path / "ckpt"), max_seq_length=128)
    assert tokenizer.model_max_length == 128


def test_special_tokens_are_added_once(tmp_path):
    tokenizer = load_tokenizer(write_bpe_checkpoint(tmp_path / "ckpt"))
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = load_tokenizer(tmp_path / "saved")
    assert len(reloaded) == len(tokenizer)
    assert reloaded.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))


def test_internlm2_folder_uses_our_tokenizer_not_the_checkpoint_code(tmp_path):
    folder = write_internlm2_checkpoint(tmp_path / "ckpt")
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, InternLM2Tokenizer)
    assert InternLM2Tokenizer.vocab_files_names == {"vocab_file": "./tokenizer.model"}
    assert len(tokenizer) == _base_size(folder) + len(SPECIAL_TOKENS)
    assert tokenizer.model_max_length == 32768
    # added_tokens_decoder from the config: ChatML markers keep their sentencepiece ids and stay whole.
    assert tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"] == [3]


def test_internlm2_encoding_adds_bos_only(tmp_path):
    tokenizer = load_tokenizer(write_internlm2_checkpoint(tmp_path / "ckpt"))
    assert tokenizer.add_bos_token and not tokenizer.add_eos_token
    ids = tokenizer("A cat sits on a mat.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2 and 2 not in ids
    assert tokenizer("A cat sits on a mat.", add_special_tokens=False)["input_ids"] == ids[1:]


@pytest.mark.parametrize(
    "text",
    ["A cat sits on a mat.", "你好，世界。", "colour 1234 apples!", "line one\nline two", "emoji 🐈 falls back to bytes"],
)
def test_internlm2_round_trip(tmp_path, text):
    tokenizer = load_tokenizer(write_internlm2_checkpoint(tmp_path / "ckpt"))
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_internlm2_decode_follows_the_official_rules(tmp_path):
    tokenizer = load_tokenizer(write_internlm2_checkpoint(tmp_path / "ckpt"))
    ids = tokenizer("A cat.<|im_end|>\n<img><IMG_CONTEXT></img>", add_special_tokens=False)["input_ids"]
    # Official quirk: a space goes before each run of text that ends at a special token.
    assert tokenizer.decode(ids) == " A cat.<|im_end|> \n<img><IMG_CONTEXT></img>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A cat.\n"


def test_internlm2_save_and_reload(tmp_path):
    tokenizer = load_tokenizer(write_internlm2_checkpoint(tmp_path / "ckpt"))
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = load_tokenizer(tmp_path / "saved")
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>你好<|im_end|>"
    assert isinstance(reloaded, InternLM2Tokenizer)
    assert len(reloaded) == len(tokenizer)
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_unreadable_folder_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SomethingElse"}))
    with pytest.raises(ValueError, match="SomethingElse"):
        load_tokenizer(tmp_path)


def test_resize_embeddings_adds_mean_initialised_rows(tmp_path):
    folder = write_bpe_checkpoint(tmp_path / "ckpt")
    tokenizer = load_tokenizer(folder)
    base = _base_size(folder)
    config = LlamaConfig(
        vocab_size=base,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    assert resize_embeddings_for_tokenizer(model, tokenizer) == len(SPECIAL_TOKENS)
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    assert new_in.shape[0] == new_out.shape[0] == len(tokenizer) == model.config.vocab_size
    torch.testing.assert_close(new_in[:base], old_in)
    torch.testing.assert_close(new_out[:base], old_out)
    torch.testing.assert_close(new_in[base:], old_in.mean(0, keepdim=True).expand(len(SPECIAL_TOKENS), -1))
    torch.testing.assert_close(new_out[base:], old_out.mean(0, keepdim=True).expand(len(SPECIAL_TOKENS), -1))
    assert resize_embeddings_for_tokenizer(model, tokenizer) == 0  # already large enough: untouched
