"""The `internvl-lora` command line, run as a real subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from internvl.model.internvl_chat import InternVLChatModel
from internvl.tiny import tiny_config
from internvl.train.outputs import save_outputs
from tests.builders import build_batch, build_model


def cli(*args: str, umask: int = -1) -> subprocess.CompletedProcess:
    """`internvl-lora ARGS` in a new process (under `umask` when given)."""
    return subprocess.run([sys.executable, "-m", "internvl.cli", *args], capture_output=True, text=True, timeout=600,
                          umask=umask)


def test_inspect_an_official_model_by_name_without_network():
    result = cli("inspect", "InternVL2_5-8B", "--llm-lora", "16")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "InternLM2ForCausalLM" in out and "attention.wqkv" in out and "ESTIMATE" in out
    # 32 layers x r=16 x (wqkv 4096->6144, wo 4096->4096, w1/w3 4096->14336, w2 14336->4096)
    per_layer = 16 * ((4096 + 6144) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096))
    assert f"trainable: {32 * per_layer:,}" in out


def test_inspect_a_checkpoint_folder_counts_backbone_lora(tmp_path):
    model = build_model("Qwen2ForCausalLM")
    model.save_pretrained(tmp_path)
    result = cli("inspect", str(tmp_path), "--llm-lora", "4", "--backbone-lora", "2")
    assert result.returncode == 0, result.stderr
    vit_lora = 2 * 2 * ((32 + 96) + (32 + 32) + (32 + 64) + (64 + 32))  # 2 layers, r=2
    llm_lora = 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))  # q, o; k, v; gate, up, down
    assert f"trainable: {vit_lora + llm_lora:,}" in result.stdout
    vit_params = sum(p.numel() for p in model.vision_model.parameters())
    assert re.search(rf"vision_model\s+{vit_params:,}", result.stdout)


def test_inspect_an_unknown_name_suggests_official_ones():
    result = cli("inspect", "InternVL2_5-8", "--llm-lora", "16")
    assert result.returncode == 2
    assert "InternVL2_5-8B" in result.stderr


def test_merge_unwraps_saves_official_format_and_copies_the_tokenizer(tmp_path, tokenizer):
    model = build_model("InternLM2ForCausalLM")
    model.wrap_backbone_lora(r=2, lora_alpha=4, init_lora_weights=False, verbose=False)
    model.wrap_llm_lora(r=4, lora_alpha=8, init_lora_weights=False, verbose=False)
    model.save_pretrained(tmp_path / "lora")
    tokenizer.save_pretrained(tmp_path / "lora")

    lora, merged_dir = tmp_path / "lora", tmp_path / "merged"
    result = cli("merge", str(lora), str(merged_dir))
    assert result.returncode == 0, result.stderr
    assert f"merged {lora} into {merged_dir}: vision_model r=2, language_model r=4" in result.stdout

    config = json.loads((merged_dir / "config.json").read_text())
    assert (config["use_llm_lora"], config["use_backbone_lora"]) == (0, 0)
    assert config["merged_lora"] == [{"from": str(lora), "lora": {"vision_model": 2, "language_model": 4}}]
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = InternVLChatModel.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    batch = build_batch(model, tokenizer)
    batch.pop("labels")
    merged.img_context_token_id = model.img_context_token_id
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model.eval()(**batch).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tokenizer):
    """A base checkpoint and an adapter folder for it, as finetune writes one (LLM LoRA of random weights)."""
    root = tmp_path_factory.mktemp("adapter")
    build_model("Qwen2ForCausalLM").save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = InternVLChatModel.from_pretrained(root / "base")
    base_config = model.config.to_dict()
    model.wrap_llm_lora(r=4, lora_alpha=8, init_lora_weights=False, verbose=False)
    save_outputs(model, root / "adapter", base_config, str(root / "base"), tokenizer)
    return root / "base", root / "adapter"


def files_under(*folders) -> dict:
    """Every file below `folders`, path -> bytes: what a refused command must leave as it was."""
    return {path: path.read_bytes() for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The only line of stderr, which must be an `internvl-lora COMMAND: error:` line, exit status 2."""
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"internvl-lora {command}: error: ")
    return line


@pytest.mark.parametrize(
    ("output", "error"),
    [
        pytest.param("{tmp}/other", "{tmp}/other: not empty", id="another model"),
        pytest.param("{base}", "{base}: overlaps {base}", id="the base itself"),
        pytest.param("{base}/merged", "{base}/merged: overlaps {base}", id="inside the base"),
        pytest.param("{adapter}/merged", "{adapter}/merged: overlaps {adapter}", id="inside the adapter"),
        pytest.param("{tmp}/notes.txt", "{tmp}/notes.txt: is a file", id="a file"),
    ],
)
def test_merge_refuses_an_output_whose_contents_it_would_lose(adapter, tmp_path, output, error):
    base, folder = adapter
    build_model("LlamaForCausalLM").save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "README.md").write_text("another model\n")
    (tmp_path / "notes.txt").write_text("notes\n")
    before = files_under(tmp_path, base.parent)
    names = dict(tmp=tmp_path, base=base, adapter=folder)
    result = cli("merge", str(base), output.format(**names), "--adapter", str(folder))
    assert error.format(**names) in one_error_line(result, "merge")
    assert files_under(tmp_path, base.parent) == before


def test_merge_overwrite_replaces_only_a_model_merged_before(adapter, tmp_path):
    base, folder = adapter
    merged, other = tmp_path / "merged", tmp_path / "other"
    first = cli("merge", str(base), str(merged), "--adapter", str(folder))
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"merged {folder} into {merged}: language_model r=4" in first.stdout
    again = cli("merge", str(base), str(merged), "--adapter", str(folder))
    assert f"{merged}: not empty; pass a new folder (--overwrite" in one_error_line(again, "merge")
    replaced = cli("merge", str(base), str(merged), "--adapter", str(folder), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    other.mkdir()
    (other / "README.md").write_text("mine\n")
    refused = cli("merge", str(base), str(other), "--adapter", str(folder), "--overwrite")
    assert f"{other}: not a model merged by internvl-lora" in one_error_line(refused, "merge")
    assert (other / "README.md").read_text() == "mine\n"


def test_merge_of_a_model_without_lora_and_without_an_adapter_says_there_is_nothing_to_merge(adapter, tmp_path):
    base, _ = adapter
    result = cli("merge", str(base), str(tmp_path / "merged"))
    assert f"{base}: nothing to merge" in one_error_line(result, "merge")
    assert not (tmp_path / "merged").exists()


def test_a_merged_model_is_readable_by_everyone_the_umask_allows(adapter, tmp_path):
    base, folder = adapter
    merged = tmp_path / "merged"
    result = cli("merge", str(base), str(merged), "--adapter", str(folder), umask=0o022)
    assert result.returncode == 0, result.stderr[-3000:]
    modes = {path.name: path.stat().st_mode & 0o777 for path in [merged, *merged.iterdir()]}
    assert modes.pop("merged") == 0o755
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}


@pytest.mark.parametrize(
    ("command", "truncated"),
    [pytest.param("chat", "base/model.safetensors", id="checkpoint"),
     pytest.param("merge", "adapter/llm_adapter/adapter_model.safetensors", id="adapter")],
)
def test_a_truncated_weights_file_is_named_in_one_error_line(adapter, tmp_path, command, truncated):
    import shutil

    for folder in adapter:
        shutil.copytree(folder, tmp_path / folder.name)
    path = tmp_path / truncated
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    target = ["Hello?"] if command == "chat" else [str(tmp_path / "merged")]
    result = cli(command, str(tmp_path / "base"), *target, "--adapter", str(tmp_path / "adapter"))
    assert f"{path}: truncated or corrupt safetensors file" in one_error_line(result, command)


@pytest.mark.parametrize(("image", "error"), [pytest.param("{tmp}", "--image {tmp}: a folder", id="folder"),
                                              pytest.param("{tmp}/notes.txt", "unreadable image: {tmp}/notes.txt",
                                                           id="not an image")])
def test_chat_names_an_image_it_cannot_read_in_one_error_line(adapter, tmp_path, image, error):
    base, _ = adapter
    (tmp_path / "notes.txt").write_text("not an image\n")
    result = cli("chat", str(base), "What is it?", "--image", image.format(tmp=tmp_path))
    assert error.format(tmp=tmp_path) in one_error_line(result, "chat")


def test_chat_names_a_missing_adapter_before_anything_else(adapter, tmp_path):
    base, _ = adapter
    result = cli("chat", str(base), "Hello?", "--adapter", str(tmp_path / "nope"))
    assert f"{tmp_path / 'nope'}: no manifest.json; not an adapter folder" in one_error_line(result, "chat")


def test_an_adapter_on_another_base_is_refused_naming_the_flag_that_forces_it(adapter, tmp_path):
    _, folder = adapter
    other = tmp_path / "other"
    build_model("Qwen2ForCausalLM", seed=1, template="Hermes-2").save_pretrained(other)  # same sizes
    refused = cli("merge", str(other), str(tmp_path / "merged"), "--adapter", str(folder))
    assert "or force it (--force_base_model)" in one_error_line(refused, "merge")
    forced = cli("merge", str(other), str(tmp_path / "merged"), "--adapter", str(folder), "--force_base_model")
    assert forced.returncode == 0, forced.stderr[-3000:]


def test_an_adapter_forced_onto_a_base_of_other_sizes_names_the_first_weight_that_does_not_fit(adapter, tmp_path):
    _, folder = adapter
    config = tiny_config("Qwen2ForCausalLM")
    config.llm_config.hidden_size = 96
    InternVLChatModel(config).save_pretrained(tmp_path / "wider")
    result = cli("merge", str(tmp_path / "wider"), str(tmp_path / "merged"), "--adapter", str(folder),
                 "--force-base-model")
    line = one_error_line(result, "merge")
    assert re.search(rf"{folder / 'llm_adapter' / 'adapter_model.safetensors'}: base_model\.model\.model\.layers\.0\."
                     r"\S+ has shape \(\d+, (64|4)\), the model's \(\d+, (96|4)\): these weights were trained on a "
                     "base model of other sizes", line), line
