"""Checkpoint folders: official key names and shapes, sharding, LoRA checkpoints, pickles, expert layout."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from safetensors import safe_open

from internvl import checkpoint
from internvl.model.internvl_chat import InternVLChatModel
from tests.builders import build_batch, build_model


def saved_shapes(folder) -> dict[str, tuple]:
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as reader:
            shapes.update({k: tuple(reader.get_slice(k).get_shape()) for k in reader.keys()})
    return shapes


def common_keys(hidden: int, vit: int, layers: int = 2) -> dict[str, tuple]:
    """Keys the reference notes give for every InternVL checkpoint (300M-style ViT, patch 14, 56-pixel tiles)."""
    patches = (56 // 14) ** 2
    keys = {
        "vision_model.embeddings.class_embedding": (1, 1, vit),
        "vision_model.embeddings.patch_embedding.weight": (vit, 3, 14, 14),
        "vision_model.embeddings.position_embedding": (1, 1 + patches, vit),
        "mlp1.0.weight": (vit * 4,),
        "mlp1.1.weight": (hidden, vit * 4),
        "mlp1.3.weight": (hidden, hidden),
    }
    for i in range(layers):
        prefix = f"vision_model.encoder.layers.{i}."
        keys.update({
            prefix + "attn.qkv.weight": (3 * vit, vit), prefix + "attn.qkv.bias": (3 * vit,),
            prefix + "attn.proj.weight": (vit, vit), prefix + "mlp.fc1.weight": (2 * vit, vit),
            prefix + "mlp.fc2.weight": (vit, 2 * vit), prefix + "norm1.weight": (vit,), prefix + "ls1": (vit,),
            prefix + "ls2": (vit,),
        })
    return keys


# Tiny shape: hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, vocab 640, ViT hidden 32.
OFFICIAL_LLM_KEYS = {
    "InternLM2ForCausalLM": {
        "language_model.model.tok_embeddings.weight": (640, 64),
        # packed per KV group: (4 query heads + 2 KV groups x (k + v)) x 16
        "language_model.model.layers.0.attention.wqkv.weight": ((4 + 2 * 2) * 16, 64),
        "language_model.model.layers.0.attention.wo.weight": (64, 64),
        "language_model.model.layers.0.feed_forward.w1.weight": (128, 64),
        "language_model.model.layers.0.feed_forward.w3.weight": (128, 64),
        "language_model.model.layers.0.feed_forward.w2.weight": (64, 128),
        "language_model.model.layers.0.attention_norm.weight": (64,),
        "language_model.model.layers.0.ffn_norm.weight": (64,),
        "language_model.model.norm.weight": (64,),
        "language_model.output.weight": (640, 64),
    },
    "Qwen2ForCausalLM": {
        "language_model.model.embed_tokens.weight": (640, 64),
        "language_model.model.layers.0.self_attn.q_proj.weight": (64, 64),
        "language_model.model.layers.0.self_attn.q_proj.bias": (64,),
        "language_model.model.layers.0.self_attn.k_proj.weight": (32, 64),
        "language_model.model.layers.0.self_attn.v_proj.bias": (32,),
        "language_model.model.layers.0.self_attn.o_proj.weight": (64, 64),
        "language_model.model.layers.0.mlp.gate_proj.weight": (128, 64),
        "language_model.model.layers.0.mlp.up_proj.weight": (128, 64),
        "language_model.model.layers.0.mlp.down_proj.weight": (64, 128),
        "language_model.model.layers.0.input_layernorm.weight": (64,),
        "language_model.model.layers.0.post_attention_layernorm.weight": (64,),
        "language_model.lm_head.weight": (640, 64),
    },
    "LlamaForCausalLM": {
        "language_model.model.embed_tokens.weight": (640, 64),
        "language_model.model.layers.1.self_attn.q_proj.weight": (64, 64),
        "language_model.model.layers.1.self_attn.k_proj.weight": (32, 64),
        "language_model.model.layers.1.mlp.down_proj.weight": (64, 128),
        "language_model.lm_head.weight": (640, 64),
    },
    "Phi3ForCausalLM": {
        "language_model.model.embed_tokens.weight": (640, 64),
        "language_model.model.layers.0.self_attn.qkv_proj.weight": (64 + 2 * 32, 64),
        "language_model.model.layers.0.self_attn.o_proj.weight": (64, 64),
        "language_model.model.layers.0.mlp.gate_up_proj.weight": (2 * 128, 64),
        "language_model.model.layers.0.mlp.down_proj.weight": (64, 128),
        "language_model.lm_head.weight": (640, 64),
    },
}


@pytest.mark.parametrize("arch", sorted(OFFICIAL_LLM_KEYS))
def test_saved_checkpoint_has_the_official_key_names_and_shapes(arch, tmp_path):
    build_model(arch).save_pretrained(tmp_path)
    shapes = saved_shapes(tmp_path)
    expected = {**common_keys(hidden=64, vit=32), **OFFICIAL_LLM_KEYS[arch]}
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert all(k.split(".")[0] in {"vision_model", "mlp1", "language_model"} for k in shapes)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["architectures"] == ["InternVLChatModel"]
    assert config["llm_config"]["architectures"] == [arch]
    assert "rope_theta" in config["llm_config"] and "rope_parameters" not in config["llm_config"]
    for field in ("use_backbone_lora", "use_llm_lora", "select_layer", "downsample_ratio", "template",
                  "ps_version", "force_image_size", "dynamic_image_size", "use_thumbnail", "max_dynamic_patch"):
        assert field in config, field


def test_lora_checkpoint_has_the_official_trainers_peft_key_names(tmp_path):
    model = build_model("InternLM2ForCausalLM")
    model.wrap_llm_lora(r=4, lora_alpha=8, verbose=False)
    model.wrap_backbone_lora(r=2, lora_alpha=4, verbose=False)
    model.save_pretrained(tmp_path)
    shapes = saved_shapes(tmp_path)
    wqkv = "language_model.base_model.model.model.layers.0.attention.wqkv."
    assert shapes[wqkv + "base_layer.weight"] == (128, 64)
    assert shapes[wqkv + "lora_A.default.weight"] == (4, 64)
    assert shapes[wqkv + "lora_B.default.weight"] == (128, 4)
    assert "vision_model.base_model.model.encoder.layers.0.attn.qkv.lora_A.default.weight" in shapes
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["use_llm_lora"], config["use_backbone_lora"]) == (4, 2)


def test_sharded_checkpoint_writes_an_index_and_loads_back(tmp_path, tokenizer):
    model = build_model("Qwen2ForCausalLM")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / checkpoint.SAFE_INDEX).read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    batch = build_batch(model, tokenizer)
    batch.pop("labels")
    reloaded = InternVLChatModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert reloaded.language_model.lm_head.weight.dtype == torch.bfloat16
    reloaded = InternVLChatModel.from_pretrained(tmp_path)
    reloaded.img_context_token_id = model.img_context_token_id
    assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_qwen3_moe_experts_are_saved_one_linear_per_expert(tmp_path, tokenizer):
    model = build_model("Qwen3MoeForCausalLM")
    model.save_pretrained(tmp_path)
    shapes = saved_shapes(tmp_path)
    prefix = "language_model.model.layers.0.mlp."
    assert shapes[prefix + "experts.3.gate_proj.weight"] == (32, 64)
    assert shapes[prefix + "experts.3.up_proj.weight"] == (32, 64)
    assert shapes[prefix + "experts.3.down_proj.weight"] == (64, 32)
    assert shapes[prefix + "gate.weight"] == (4, 64)
    assert not any(k.endswith("gate_up_proj") for k in shapes)
    reloaded = InternVLChatModel.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_pickled_weights_load_with_weights_only_and_code_is_refused(tmp_path):
    model = build_model("LlamaForCausalLM")
    model.save_pretrained(tmp_path / "safe")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / checkpoint.PICKLE_WEIGHTS)
    reloaded = InternVLChatModel.from_pretrained(pickled)
    assert torch.equal(reloaded.mlp1[1].weight, model.mlp1[1].weight)

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    with open(pickled / checkpoint.PICKLE_WEIGHTS, "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(ValueError, match="refused to unpickle"):
        InternVLChatModel.from_pretrained(pickled)


def test_loading_a_folder_that_is_not_an_internvl_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder.*never downloaded"):
        InternVLChatModel.from_pretrained("OpenGVLab/InternVL2_5-8B")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="expected 'internvl_chat'"):
        InternVLChatModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "internvl_chat",')
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'config.json'))}: not valid JSON: Expecting"):
        InternVLChatModel.from_pretrained(tmp_path)


def test_a_failed_save_leaves_no_half_written_folder(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_directory(target) as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_saving_over_a_folder_that_holds_something_else_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("mine\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}: not empty; refusing to replace"):
        build_model("Qwen2ForCausalLM").save_pretrained(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["README.md"]


def test_a_checkpoint_saved_again_is_replaced_and_keeps_its_tokenizer(tmp_path, tokenizer):
    build_model("Qwen2ForCausalLM", seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    second = build_model("Qwen2ForCausalLM", seed=1)
    second.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert torch.equal(InternVLChatModel.from_pretrained(tmp_path).mlp1[1].weight, second.mlp1[1].weight)


def test_a_truncated_weights_file_is_named(tmp_path):
    build_model("Qwen2ForCausalLM").save_pretrained(tmp_path)
    weights = tmp_path / checkpoint.SAFE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))}: truncated or corrupt safetensors file"):
        InternVLChatModel.from_pretrained(tmp_path)
