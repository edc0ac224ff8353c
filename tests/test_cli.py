"""The `internvl-lora` command line, run as a real subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import torch

from internvl.model.internvl_chat import InternVLChatModel
from tests.builders import build_batch, build_model


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl.cli", *args], capture_output=True, text=True, timeout=300)


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

    result = cli("merge", str(tmp_path / "lora"), str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (config["use_llm_lora"], config["use_backbone_lora"]) == (0, 0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = InternVLChatModel.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    batch = build_batch(model, tokenizer)
    batch.pop("labels")
    merged.img_context_token_id = model.img_context_token_id
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model.eval()(**batch).logits, rtol=1e-4, atol=1e-4)
