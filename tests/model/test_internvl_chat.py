"""InternVLChatModel on tiny real models of every LLM architecture: forward, LoRA, checkpoints, merge, chat."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from internvl.archs import LLM_ARCHS, VISION_LORA_TARGETS
from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel
from tests.builders import ARCHITECTURES, build_batch, build_model


def logits_of(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_gives_logits_and_a_finite_loss(arch, tokenizer):
    model = build_model(arch)
    batch = build_batch(model, tokenizer)
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.llm_config.vocab_size)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_wrap_llm_lora_trains_exactly_the_lora_weights_of_the_table_targets(arch, capsys):
    model = build_model(arch)
    counts = model.wrap_llm_lora(r=4, lora_alpha=8)
    row = LLM_ARCHS[arch]
    # A parameter target (fused experts) is adapted on the module that owns the parameter.
    targets = row.lora_targets + tuple(t.rsplit(".", 1)[0] for t in row.lora_target_parameters)

    assert isinstance(model.language_model, PeftModel)
    assert model.config.use_llm_lora == 4
    trainable = {n for n, p in model.language_model.named_parameters() if p.requires_grad}
    expected = set()
    for name, _ in model.language_model.named_parameters():
        owner = name.split(".lora_")[0].replace(".base_layer", "")
        if ".lora_" in name and any(owner.endswith(t) for t in targets):
            expected.add(name)
    layers = model.config.llm_config.num_hidden_layers
    assert trainable == expected
    # lora_A and lora_B of every target in every layer
    assert len(expected) == 2 * layers * len(row.lora_targets + row.lora_target_parameters)
    assert counts.trainable == sum(p.numel() for n, p in model.language_model.named_parameters() if n in expected)
    assert counts.total == sum(p.numel() for p in model.language_model.parameters())
    assert f"{counts.trainable:,}" in capsys.readouterr().out
    # The router of a mixture of experts is never adapted.
    assert not any("router" in n or ".mlp.gate." in n for n in trainable)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_gets_gradients_under_gradient_checkpointing(arch, tokenizer):
    model = build_model(arch).train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.wrap_llm_lora(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    model.gradient_checkpointing_enable()
    model(**build_batch(model, tokenizer)).loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora
    for name, param in lora:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_then_load_gives_the_same_logits_with_and_without_lora(arch, tokenizer, tmp_path):
    model = build_model(arch)
    batch = build_batch(model, tokenizer)
    model.save_pretrained(tmp_path / "base")
    reloaded = InternVLChatModel.from_pretrained(tmp_path / "base")
    reloaded.img_context_token_id = model.img_context_token_id
    assert torch.equal(logits_of(reloaded, batch), logits_of(model, batch))

    model.wrap_llm_lora(r=4, lora_alpha=8, init_lora_weights=False, verbose=False)
    model.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "config.json").read_text())["use_llm_lora"] == 4
    reloaded = InternVLChatModel.from_pretrained(tmp_path / "lora")
    reloaded.img_context_token_id = model.img_context_token_id
    assert isinstance(reloaded.language_model, PeftModel)
    assert torch.equal(logits_of(reloaded, batch), logits_of(model.eval(), batch))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_gives_the_same_logits_as_the_adapted_model(arch, tokenizer):
    model = build_model(arch)
    model.wrap_backbone_lora(r=4, lora_alpha=8, init_lora_weights=False, verbose=False)
    model.wrap_llm_lora(r=4, lora_alpha=8, init_lora_weights=False, verbose=False)
    batch = build_batch(model, tokenizer)
    adapted = logits_of(model.eval(), batch)
    model.merge_lora()
    assert not isinstance(model.language_model, PeftModel) and not isinstance(model.vision_model, PeftModel)
    assert model.config.use_llm_lora == 0 and model.config.use_backbone_lora == 0
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    torch.testing.assert_close(logits_of(model, batch), adapted, rtol=1e-4, atol=1e-4)


def test_backbone_lora_gets_gradients_with_a_frozen_vit_under_checkpointing(tokenizer):
    model = build_model("InternLM2ForCausalLM", vision_style="6B").train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.wrap_backbone_lora(r=4, lora_alpha=8, lora_dropout=0.0, verbose=False)
    model.gradient_checkpointing_enable()
    assert model.vision_model.base_model.model.encoder.layers[0].gradient_checkpointing
    model(**build_batch(model, tokenizer)).loss.backward()
    lora_b = {n: p for n, p in model.vision_model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == len(VISION_LORA_TARGETS) * model.config.vision_config.num_hidden_layers
    for name, param in lora_b.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_wrap_llm_lora_rejects_bad_arguments_and_double_wrapping():
    model = build_model("InternLM2ForCausalLM")
    with pytest.raises(ValueError, match="rank"):
        model.wrap_llm_lora(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        model.wrap_llm_lora(r=4, lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"self_attn\.q_proj.*wqkv"):
        model.wrap_llm_lora(r=4, target_modules=["self_attn.q_proj"])
    model.wrap_llm_lora(r=4, lora_alpha=8, verbose=False)
    with pytest.raises(ValueError, match="already carries LoRA"):
        model.wrap_llm_lora(r=4)


def test_wrap_llm_lora_passes_peft_options_through():
    model = build_model("Qwen2ForCausalLM")
    model.wrap_llm_lora(r=4, lora_alpha=8, target_modules=["self_attn.q_proj"], use_dora=True, use_rslora=True,
                        verbose=False)
    config = model.language_model.peft_config["default"]
    assert config.use_dora and config.use_rslora and set(config.target_modules) == {"self_attn.q_proj"}


def test_unknown_llm_architecture_is_named_with_the_supported_ones():
    with pytest.raises(ValueError, match=r"'MambaForCausalLM'.*InternLM2ForCausalLM.*Qwen3MoeForCausalLM"):
        InternVLChatConfig(llm_config={"architectures": ["MambaForCausalLM"]})


def test_image_context_count_mismatch_names_both_counts(tokenizer):
    model = build_model()
    batch = build_batch(model, tokenizer, tiles=2)
    batch["pixel_values"] = batch["pixel_values"][:1]
    batch["image_flags"] = batch["image_flags"][:1]
    tokens = model.num_image_token
    with pytest.raises(ValueError, match=rf"{2 * tokens} <IMG_CONTEXT> positions.*{tokens} features"):
        model(**batch)


def test_text_only_tiles_flagged_zero_feed_nothing_to_the_llm(tokenizer):
    model = build_model()
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    dummy = torch.zeros(1, 3, model.config.image_size, model.config.image_size)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with_dummy = model(pixel_values=dummy, input_ids=ids, image_flags=torch.zeros(1, dtype=torch.long)).logits
    torch.testing.assert_close(with_dummy, model.language_model(input_ids=ids).logits)


def test_a_text_only_batch_runs_the_vit_once_and_keeps_its_lora_in_the_graph(tokenizer):
    """DDP and ZeRO need every trainable weight used on every rank: the ViT's LoRA gets a (zero) gradient."""
    model = build_model().train()
    model.wrap_backbone_lora(r=4, lora_alpha=8, verbose=False)
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    calls = []
    model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    dummy = torch.zeros(1, 3, model.config.image_size, model.config.image_size)
    model(pixel_values=dummy, input_ids=ids, labels=ids, image_flags=torch.zeros(1, dtype=torch.long)).loss.backward()
    assert len(calls) == 1
    vit_lora = [p for n, p in model.vision_model.named_parameters() if "lora_" in n]
    assert vit_lora and all(p.grad is not None and not p.grad.any() for p in vit_lora)


def test_chat_answers_with_the_template_and_keeps_history(tokenizer):
    model = build_model("Qwen2ForCausalLM")
    pixel_values = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    config = dict(max_new_tokens=5, do_sample=False)
    answer, history = model.chat(tokenizer, pixel_values, "What colour?", config, return_history=True)
    assert isinstance(answer, str) and history == [("<image>\nWhat colour?", answer)]

    # The same answer from generate() on the prompt built by hand from the template.
    image = "<img>" + "<IMG_CONTEXT>" * (2 * model.num_image_token) + "</img>"
    prompt = (f"<|im_start|>system\n{model.system_message}<|im_end|>\n<|im_start|>user\n{image}\nWhat colour?"
              "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids),
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id, **config)
    expected = tokenizer.batch_decode(out, skip_special_tokens=True)[0].split("<|im_end|>")[0].strip()
    assert answer == expected
    second = model.chat(tokenizer, None, "And the shape?", config, history=history)
    assert isinstance(second, str)


def test_fused_expert_lora_refuses_dropout_with_a_clear_message():
    model = build_model("Qwen3MoeForCausalLM")
    with pytest.raises(ValueError, match="no dropout; pass lora_dropout=0"):
        model.wrap_llm_lora(r=4, lora_alpha=8, lora_dropout=0.05)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_split_modules_name_exactly_the_layer_classes_the_model_holds(arch):
    # FSDP's auto-wrap (accelerate) raises on a listed class that the model does not hold
    model = build_model(arch)
    held = {type(module).__name__ for module in model.modules()}
    assert len(model._no_split_modules) == 2 and set(model._no_split_modules) <= held


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_wrap_llm_lora_defaults_to_the_official_dropout_where_peft_allows_it(arch):
    model = build_model(arch)
    model.wrap_llm_lora(r=4, verbose=False)
    expected = 0.0 if LLM_ARCHS[arch].lora_target_parameters else 0.05  # fused experts: PEFT has no dropout
    assert model.language_model.peft_config["default"].lora_dropout == expected
