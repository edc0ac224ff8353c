"""transformers' native InternVL ("-hf") both ways: loading, converting, adapters, merging, and exports for serving
engines. The "-hf" side is always transformers' own `InternVLForConditionalGeneration`, built or loaded here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import InternVLConfig, InternVLForConditionalGeneration

from internvl import checkpoint
from internvl.cli import main
from internvl.convert import convert_model, convert_run
from internvl.data.constants import IMG_CONTEXT_TOKEN
from internvl.export import export_adapter
from internvl.model.internvl_chat import InternVLChatModel
from internvl.synthetic import write_dataset, write_meta
from internvl.train.outputs import save_outputs
from tests.builders import build_batch, build_model, randomize_lora

STYLES = ("300M", "6B")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl.cli", *args], capture_output=True, text=True, timeout=600)


def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value (layer scales, norms, zero biases), so no mapping hides behind them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def hf_logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch["attention_mask"]).logits


def our_logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def save_original(tmp_path, tokenizer, arch: str, style: str = "300M", name: str = "original"):
    """A tiny official-format checkpoint folder with its tokenizer, and the model."""
    model = jitter(build_model(arch, style))
    model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / name, model


@pytest.mark.parametrize("style", STYLES)
def test_a_transformers_saved_hf_checkpoint_gives_transformers_logits(tmp_path, tokenizer, style):
    six_b = style == "6B"
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14, norm_type="rms_norm" if six_b else "layer_norm",
                           use_qk_norm=six_b, attention_bias=not six_b),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=640, tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN), image_seq_length=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    theirs = jitter(InternVLForConditionalGeneration(config)).eval()
    theirs.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")

    ours = InternVLChatModel.from_pretrained(tmp_path / "hf")
    assert ours.img_context_token_id == config.image_token_id and ours.checkpoint_format == "hf"
    batch = build_batch(ours, tokenizer)
    torch.testing.assert_close(our_logits(ours, batch), hf_logits(theirs, batch), rtol=1e-5, atol=1e-5)
    assert main(["inspect", str(tmp_path / "hf")]) == 0  # inspect reads it through the same config


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM", "InternLM2ForCausalLM"])
@pytest.mark.parametrize("style", STYLES)
def test_transformers_loads_our_conversion_and_the_round_trip_is_bitwise(tmp_path, tokenizer, arch, style):
    source, model = save_original(tmp_path, tokenizer, arch, style)
    copied = convert_model(source, tmp_path / "hf", "hf")
    assert "tokenizer.json" in copied
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    batch = build_batch(model, tokenizer)
    torch.testing.assert_close(hf_logits(theirs, batch), our_logits(model, batch), rtol=1e-5, atol=1e-5)

    convert_model(tmp_path / "hf", tmp_path / "back", "original")
    before, after = checkpoint.load_state_dict(source), checkpoint.load_state_dict(tmp_path / "back")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) and before[key].dtype == after[key].dtype for key in before)
    original, back = checkpoint.read_config(source), checkpoint.read_config(tmp_path / "back")
    for field in ("template", "ps_version", "force_image_size", "dynamic_image_size", "max_dynamic_patch"):
        assert back[field] == original[field]
    assert back["llm_config"]["architectures"] == [arch]


def test_convert_cli_writes_hf_and_refuses_in_one_line(tmp_path, tokenizer):
    source, _ = save_original(tmp_path, tokenizer, "InternLM2ForCausalLM", "6B")
    result = cli("convert", str(source), str(tmp_path / "hf"), "--to", "hf")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "internvl"

    refused = cli("convert", str(source), str(tmp_path / "hf"), "--to", "hf")  # not empty: never overwritten
    assert refused.returncode == 2 and refused.stderr.startswith("internvl-lora convert: error: ")
    v1 = jitter(build_model("Qwen2ForCausalLM", ps_version="v1"))
    v1.save_pretrained(tmp_path / "v1")
    tokenizer.save_pretrained(tmp_path / "v1")
    refused = cli("convert", str(tmp_path / "v1"), str(tmp_path / "v1-hf"), "--to", "hf")
    assert refused.returncode == 2 and "ps_version" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "v1-hf").exists() and not list(tmp_path.glob(".v1-hf*"))  # nothing half-written


def hf_base(tmp_path, tokenizer, arch: str = "InternLM2ForCausalLM"):
    """A tiny "-hf" base folder (converted from the official format) and its path."""
    source, _ = save_original(tmp_path, tokenizer, arch, "6B")
    convert_model(source, tmp_path / "hf", "hf")
    return tmp_path / "hf"


def peft_on_transformers(base, run, parts=("llm_adapter", "vision_adapter")):
    """transformers' own InternVL with the run's adapters put on by plain PEFT, all active."""
    model = InternVLForConditionalGeneration.from_pretrained(base)
    model = PeftModel.from_pretrained(model, run / parts[0], adapter_name=parts[0])
    for part in parts[1:]:
        model.load_adapter(run / part, adapter_name=part)
    model.base_model.set_adapter(list(parts))
    return model.eval()


def test_finetune_on_an_hf_base_writes_adapters_plain_peft_puts_on_transformers_model(tmp_path, tokenizer):
    base = hf_base(tmp_path, tokenizer)
    write_meta(tmp_path / "train.json", {"d": write_dataset(tmp_path, "d", ("colour",), 4, 56, seed=1)})
    result = cli(
        "finetune", "--model_name_or_path", str(base), "--meta_path", str(tmp_path / "train.json"), "--conv_style",
        "internvl2_5",
        "--force_image_size", "56", "--max_dynamic_patch", "1", "--freeze_llm", "True", "--freeze_backbone", "True",
        "--freeze_mlp", "True", "--use_llm_lora", "4", "--use_backbone_lora", "4", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "5e-2", "--report_to", "none", "--use_cpu", "True",
        "--output_dir", str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    with safe_open(run / "llm_adapter" / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.language_model.layers.0.self_attn.k_proj.lora_B.weight" in f.keys()

    ours = InternVLChatModel.from_pretrained(base)
    batch = build_batch(ours, tokenizer)
    plain = our_logits(ours, batch)
    from internvl.train.outputs import load_adapter

    load_adapter(ours, run)
    tuned = our_logits(ours, batch)
    assert not torch.allclose(tuned, plain, atol=1e-4)  # the adapters change the answer
    torch.testing.assert_close(hf_logits(peft_on_transformers(base, run), batch), tuned, rtol=1e-5, atol=1e-5)

    merged = cli("merge", str(base), str(tmp_path / "merged"), "--adapter", str(run))
    assert merged.returncode == 0, merged.stderr
    assert checkpoint.folder_format(tmp_path / "merged") == "hf"  # the base's format
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(hf_logits(theirs, batch), tuned, rtol=1e-4, atol=1e-4)


def trained_run(tmp_path, tokenizer, base, vision: bool = True, name: str = "run"):
    """Outputs of a LoRA run (random non-zero adapters) on the base folder, as finetune writes them; the model."""
    model = InternVLChatModel.from_pretrained(base)
    base_config = model.config.to_dict()
    model.requires_grad_(False)  # only LoRA trains, as with --freeze_llm/backbone/mlp True
    model.wrap_llm_lora(r=4, lora_alpha=8, verbose=False)
    if vision:
        model.wrap_backbone_lora(r=4, lora_alpha=8, verbose=False)
    randomize_lora(model)
    save_outputs(model.eval(), tmp_path / name, base_config, str(base), tokenizer)
    return tmp_path / name, model


def test_convert_an_original_run_to_hf_and_back(tmp_path, tokenizer):
    source, _ = save_original(tmp_path, tokenizer, "InternLM2ForCausalLM", "6B")
    run, model = trained_run(tmp_path, tokenizer, source)
    convert_model(source, tmp_path / "hf", "hf")
    convert_run(run, tmp_path / "run-hf", "hf", base=tmp_path / "hf")
    batch = build_batch(model, tokenizer)
    torch.testing.assert_close(hf_logits(peft_on_transformers(tmp_path / "hf", tmp_path / "run-hf"), batch),
                               our_logits(model, batch), rtol=1e-5, atol=1e-5)

    convert_run(tmp_path / "run-hf", tmp_path / "run-back", "original", base=source)
    for part in ("llm_adapter", "vision_adapter"):
        before = checkpoint.read_safetensors(run / part / "adapter_model.safetensors")
        after = checkpoint.read_safetensors(tmp_path / "run-back" / part / "adapter_model.safetensors")
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_qkv_adapters_without_one_shared_a_are_refused(tmp_path, tokenizer):
    base = hf_base(tmp_path, tokenizer, "Qwen2ForCausalLM")
    run, _ = trained_run(tmp_path, tokenizer, base)
    weights_file = run / "vision_adapter" / "adapter_model.safetensors"
    weights = checkpoint.read_safetensors(weights_file)
    key = "base_model.model.model.vision_tower.encoder.layer.0.attention.k_proj.lora_A.weight"
    weights[key] = weights[key] + 1.0  # k's A no longer q's and v's: no single qkv LoRA equals them
    from safetensors.torch import save_file

    save_file(weights, weights_file)
    result = cli("convert", str(run), str(tmp_path / "back"), "--to", "original")
    assert result.returncode == 2 and "do not share one A" in result.stderr
    assert not (tmp_path / "back").exists()


def adapter_keys(folder) -> list[str]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return sorted(f.keys())


def test_export_for_vllm_and_lmdeploy_writes_their_key_names(tmp_path, tokenizer):
    internlm2, _ = save_original(tmp_path, tokenizer, "InternLM2ForCausalLM", name="internlm2")
    run, _ = trained_run(tmp_path, tokenizer, internlm2)
    result = cli("export", str(run), str(tmp_path / "vllm"), "--for", "vllm")
    assert result.returncode == 0, result.stderr
    keys = adapter_keys(tmp_path / "vllm")
    assert "base_model.model.language_model.model.layers.1.attention.wqkv.lora_A.weight" in keys
    assert "base_model.model.vision_model.encoder.layers.0.attn.qkv.lora_B.weight" in keys
    assert "--enable-tower-connector-lora" in result.stdout and "vLLM 0.32" in result.stdout
    assert result.stdout == (tmp_path / "vllm" / "README.md").read_text()

    refused = cli("export", str(run), str(tmp_path / "lmdeploy"), "--for", "lmdeploy")  # a ViT LoRA
    assert refused.returncode == 2 and "ViT LoRA" in refused.stderr and "merge" in refused.stderr
    llm_only, _ = trained_run(tmp_path, tokenizer, internlm2, vision=False, name="llm-run")
    export_adapter(llm_only, tmp_path / "lmdeploy", "lmdeploy")
    assert "base_model.model.model.layers.0.attention.wqkv.lora_A.weight" in adapter_keys(tmp_path / "lmdeploy")
    config = json.loads((tmp_path / "lmdeploy" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attention.wo", "attention.wqkv", "feed_forward.w1", "feed_forward.w2",
                                        "feed_forward.w3"]

    qwen2, _ = save_original(tmp_path, tokenizer, "Qwen2ForCausalLM", name="qwen2")
    qwen_run, _ = trained_run(tmp_path, tokenizer, qwen2, vision=False, name="qwen-run")
    export_adapter(qwen_run, tmp_path / "lmdeploy-qwen2", "lmdeploy")
    assert ("base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"
            in adapter_keys(tmp_path / "lmdeploy-qwen2"))


def test_export_refuses_trained_projector_weights(tmp_path, tokenizer):
    source, _ = save_original(tmp_path, tokenizer, "Qwen2ForCausalLM")
    model = InternVLChatModel.from_pretrained(source)
    base_config = model.config.to_dict()
    model.requires_grad_(False)
    model.wrap_llm_lora(r=4, lora_alpha=8, verbose=False)
    for param in model.mlp1.parameters():
        param.requires_grad = True  # the projector trained in full, as --freeze_mlp False does
    save_outputs(model, tmp_path / "run", base_config, str(source), tokenizer)
    result = cli("export", str(tmp_path / "run"), str(tmp_path / "out"), "--for", "vllm")
    assert result.returncode == 2 and "mlp1.0.weight" in result.stderr and "merge" in result.stderr
    assert not (tmp_path / "out").exists()
