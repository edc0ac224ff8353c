"""What a fine-tune writes and how it goes back onto a model: one real CLI run whose settings all differ from its
base's (template, tile size, tiling, pixel shuffle, ViT layer, a tokenizer with new tokens), with ViT LoRA and
unfrozen ViT layers, written under an explicit umask."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from internvl.model.internvl_chat import InternVLChatModel
from internvl.synthetic import write_dataset, write_meta
from internvl.train.outputs import RESIZED_EMBEDDINGS, TRAINED_WEIGHTS, ServingSettings, load_adapter
from tests.builders import build_batch, build_model
from tests.test_cli import cli

NEW_TOKENS = ["<extra_0>", "<extra_1>", "<extra_2>"]  # beyond the base's vocabulary
UMASK = 0o027
SERVING = {"template": "Hermes-2", "force_image_size": 56, "dynamic_image_size": True, "use_thumbnail": False,
           "min_dynamic_patch": 1, "max_dynamic_patch": 2, "ps_version": "v1", "select_layer": -2,
           "downsample_ratio": 0.5, "normalize_type": "clip"}
# The base's own: the tiny config's 28-pixel tiles, thumbnails, up to 6 tiles, v2 pixel shuffle, the last ViT layer.
RECIPE = ["--conv_style", "Hermes-2", "--force_image_size", "56", "--dynamic_image_size", "True",
          "--use_thumbnail", "False", "--max_dynamic_patch", "2", "--ps_version", "v1", "--vision_select_layer", "-2",
          "--normalize_type", "clip",
          "--freeze_llm", "True", "--freeze_backbone", "True", "--freeze_mlp", "False", "--use_llm_lora", "4",
          "--use_backbone_lora", "2", "--unfreeze_vit_layers", "-2", "--per_device_train_batch_size", "2",
          "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "True"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from internvl.tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("outputs")
    tokenizer = tiny_tokenizer()
    base = root / "base"
    model = build_model("Qwen2ForCausalLM", template="internvl2_5", image_size=28, vocab_size=len(tokenizer))
    model.save_pretrained(base)
    tokenizer.add_tokens(NEW_TOKENS)
    tokenizer.save_pretrained(base)
    data = write_dataset(root / "data", "shapes", ("colour",), 8, 56, seed=0)
    meta = write_meta(root / "meta.json", {"shapes": data})
    out = root / "run"
    args = ["finetune", "--model_name_or_path", str(base), "--meta_path", str(meta), *RECIPE]
    result = cli(*args, "--max_steps", "2", "--save_steps", "1", "--save_full_model", "True", "--output_dir", str(out),
                 umask=UMASK)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, base, out, args, tokenizer


def test_every_folder_and_file_of_a_run_follows_the_umask(run):
    _, _, out, _, _ = run
    assert (out / "checkpoint-1" / "llm_adapter").is_dir() and (out / "full_model").is_dir()
    modes = {path.relative_to(out): path.stat().st_mode & 0o777 for path in [out, *out.rglob("*")]}
    expected = {path: (0o777 if (out / path).is_dir() else 0o666) & ~UMASK for path in modes}
    assert modes == expected


def test_the_manifest_records_what_serving_needs(run):
    _, _, out, _, tokenizer = run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["serving"] == SERVING
    assert manifest["vocab_size"] == {"base": len(tokenizer) - len(NEW_TOKENS), "trained": len(tokenizer)}
    assert manifest["resized_embeddings"] == ["language_model.lm_head.weight",
                                              "language_model.model.embed_tokens.weight"]
    with safe_open(out / RESIZED_EMBEDDINGS, "pt") as rows:
        assert {key: tuple(rows.get_slice(key).get_shape()) for key in rows.keys()} == {
            name: (len(NEW_TOKENS), 64) for name in manifest["resized_embeddings"]}


def test_trained_weights_have_the_official_names(run):
    _, base, out, _, _ = run
    with safe_open(out / TRAINED_WEIGHTS, "pt") as weights:
        names = set(weights.keys())
    with safe_open(base / "model.safetensors", "pt") as official:
        official_names = set(official.keys())
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in names  # an unfrozen ViT layer's LoRA-wrapped linear
    assert "mlp1.1.weight" in names
    assert names <= official_names


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_an_adapter_puts_the_runs_settings_vocabulary_and_weights_onto_its_base(run):
    _, base, out, _, tokenizer = run
    adapted = InternVLChatModel.from_pretrained(base)
    load_adapter(adapted, out)
    assert ServingSettings.from_model(adapted) == ServingSettings(**SERVING)
    assert (adapted.template, adapted.ps_version, adapted.select_layer, adapted.num_image_token) == (
        "Hermes-2", "v1", -2, 4)
    merged = InternVLChatModel.from_pretrained(out / "full_model")
    batch = build_batch(adapted, tokenizer)
    batch.pop("labels")
    new_token = torch.tensor([tokenizer.convert_tokens_to_ids(NEW_TOKENS)])
    batch["input_ids"] = torch.cat([batch["input_ids"], new_token], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    merged.img_context_token_id = adapted.img_context_token_id
    torch.testing.assert_close(_logits(adapted, batch), _logits(merged, batch), rtol=1e-5, atol=1e-5)


def test_a_resumed_run_reloads_the_checkpoint_it_resumes_from(run):
    """The trained weights, saved under official names, go back into the PEFT-wrapped model of a resumed run."""
    from internvl.data.tokenizer import load_tokenizer
    from internvl.train.args import parse_finetune_args
    from internvl.train.finetune import prepare_model
    from internvl.train.outputs import load_outputs_into, official_name

    _, base, out, args, _ = run
    model_args, data_args, _ = parse_finetune_args([*args[1:], "--output_dir", str(out)])
    model = prepare_model(InternVLChatModel.from_pretrained(base), load_tokenizer(base), model_args, data_args)
    load_outputs_into(model, out / "checkpoint-2")
    with safe_open(out / "checkpoint-2" / TRAINED_WEIGHTS, "pt") as weights:
        saved = {key: weights.get_tensor(key) for key in weights.keys()}
    loaded = {official_name(name): param for name, param in model.named_parameters() if official_name(name) in saved}
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_resuming_with_another_lora_rank_is_refused_in_one_line(run, tmp_path):
    _, _, out, args, _ = run
    result = cli(*args, "--use_llm_lora", "8", "--max_steps", "3", "--resume_from_checkpoint",
                 str(out / "checkpoint-1"), "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (f"internvl-lora finetune: error: {out / 'checkpoint-1'}: this checkpoint was trained with --use_llm_lora "
            "4, but this run asks for --use_llm_lora 8; resume with --use_llm_lora 4") in result.stderr


def test_chat_with_the_adapter_answers_as_the_merged_model_with_the_runs_tiling(run, tmp_path):
    _, base, out, _, _ = run
    wide = Image.new("RGB", (112, 56), (220, 30, 30))
    wide.save(tmp_path / "wide.png")
    assert ServingSettings(**SERVING).image_tiles(wide).shape == (2, 3, 56, 56)  # the base's settings: 9 of 28
    question = f"What colour is {NEW_TOKENS[0]}?"
    chat = ["--image", str(tmp_path / "wide.png"), "--max-new-tokens", "6"]
    from_adapter = cli("chat", str(base), question, "--adapter", str(out), *chat)
    from_merged = cli("chat", str(out / "full_model"), question, *chat)
    assert from_adapter.returncode == 0, from_adapter.stderr[-2000:]
    assert from_merged.returncode == 0, from_merged.stderr[-2000:]
    assert from_adapter.stdout == from_merged.stdout


def test_merge_writes_the_runs_settings_vocabulary_and_a_record_of_the_merge(run, tmp_path):
    _, base, out, _, tokenizer = run
    merged = tmp_path / "merged"
    result = cli("merge", str(base), str(merged), "--adapter", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"merged {out} into {merged}: vision_model r=2, language_model r=4" in result.stdout
    config = json.loads((merged / "config.json").read_text())
    assert {key: config[key] for key in SERVING} == SERVING
    assert config["llm_config"]["vocab_size"] == len(tokenizer)
    assert config["merged_lora"] == [{"from": str(out), "lora": {"vision_model": 2, "language_model": 4}}]
    full = InternVLChatModel.from_pretrained(out / "full_model")
    for name, tensor in InternVLChatModel.from_pretrained(merged).state_dict().items():
        torch.testing.assert_close(tensor, full.state_dict()[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("command", ["chat", "merge"])
def test_an_adapter_onto_a_model_that_has_it_merged_in_is_refused(run, tmp_path, command):
    _, _, out, _, _ = run
    target = ["Hello?"] if command == "chat" else [str(tmp_path / "twice")]
    result = cli(command, str(out / "full_model"), *target, "--adapter", str(out))
    assert result.returncode == 2
    assert (f"internvl-lora {command}: error: {out}: the model given already has LoRA merged in (from {out}); "
            "putting these adapters on it would apply LoRA twice") in result.stderr
    assert "--force_base_model" in result.stderr
