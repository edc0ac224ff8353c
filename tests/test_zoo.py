"""The shipped configs of the official InternVL family: complete, loadable, and true to the published models."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from internvl import zoo
from internvl.archs import LLM_ARCHS, llm_arch, resolve
from internvl.model.chat_config import InternVLChatConfig

NAMES = zoo.official_names()
REQUIRED = {
    "architectures", "model_type", "template", "downsample_ratio", "force_image_size", "ps_version", "select_layer",
    "dynamic_image_size", "use_thumbnail", "max_dynamic_patch", "min_dynamic_patch", "use_backbone_lora",
    "use_llm_lora", "vision_config", "llm_config",
}  # fmt: skip


def test_the_whole_family_is_shipped_under_its_official_names():
    assert len(NAMES) == 30
    for name in ("InternVL2-Llama3-76B", "InternVL2_5-8B", "InternVL3-9B", "InternVL3_5-GPT-OSS-20B-A4B-Preview"):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_file_records_where_it_came_from(name):
    raw = json.loads((resources.files("internvl") / "zoo_configs" / f"{name}.json").read_text())
    assert isinstance(raw["_source"], str) and raw["_source"]
    assert not any(key.startswith("_") for key in zoo.official_config(name))


@pytest.mark.parametrize("name", NAMES)
def test_every_config_is_official_format_and_loads(name):
    config = zoo.official_config(name)
    assert REQUIRED <= config.keys()
    assert config["architectures"] == ["InternVLChatModel"] and config["model_type"] == "internvl_chat"
    assert (config["use_backbone_lora"], config["use_llm_lora"]) == (0, 0)
    assert config["llm_config"]["architectures"][0] in LLM_ARCHS
    loaded = InternVLChatConfig.from_dict(config)
    assert loaded.llm_config.vocab_size == config["llm_config"]["vocab_size"]
    assert loaded.vision_config.num_hidden_layers == config["vision_config"]["num_hidden_layers"]


def test_internvl2_5_8b():
    config = zoo.official_config("InternVL2_5-8B")
    vision, llm = config["vision_config"], config["llm_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"]) == (1024, 24)
    assert llm["architectures"] == ["InternLM2ForCausalLM"]
    assert (llm["hidden_size"], llm["num_hidden_layers"], llm["num_key_value_heads"]) == (4096, 32, 8)
    assert llm["vocab_size"] == 92553  # InternLM2.5's 92544 + the 9 InternVL tokens
    assert config["template"] == "internvl2_5"


def test_spot_facts_of_other_generations():
    assert zoo.official_config("InternVL3_5-30B-A3B")["llm_config"]["architectures"] == ["Qwen3MoeForCausalLM"]
    phi3 = zoo.official_config("InternVL2-4B")
    assert phi3["llm_config"]["architectures"] == ["Phi3ForCausalLM"] and phi3["template"] == "phi3-chat"
    assert zoo.official_config("InternVL3_5-GPT-OSS-20B-A4B-Preview")["template"] == "internvl3_5_gpt_oss"
    six_b = zoo.official_config("InternVL2_5-78B")["vision_config"]
    assert (six_b["hidden_size"], six_b["num_hidden_layers"], six_b["qk_normalization"]) == (3200, 45, True)


def test_llm_parameter_count_matches_the_published_checkpoint():
    # OpenGVLab/InternVL3_5-1B-HF stores 1,060,897,792 parameters; less InternViT-300M (304,012,288) and the
    # projector (5,253,120) that leaves the LLM: Qwen3-0.6B with a 151936 vocabulary and an untied head.
    llm_config = InternVLChatConfig.from_dict(zoo.official_config("InternVL3_5-1B")).llm_config
    with torch.device("meta"):
        llm = resolve(llm_arch(llm_config.architectures[0]).model_class)(llm_config)
    assert sum(p.numel() for p in llm.parameters()) == 1_060_897_792 - 304_012_288 - 5_253_120


def test_lookup_ignores_case():
    assert zoo.official_config("INTERNVL2_5-8B") == zoo.official_config("InternVL2_5-8B")


def test_an_unknown_name_suggests_close_official_ones():
    with pytest.raises(ValueError, match="InternVL2_5-8B") as error:
        zoo.official_config("internvl2_5-8")
    assert "official_names()" in str(error.value)
