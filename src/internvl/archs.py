"""One table of facts about every LLM an InternVL chat model can carry.

Everything that differs between LLM families (which class builds it, which modules LoRA targets, what the
embedding and head are called, which conversation template the family's InternVL models use) lives here as
plain data. Code elsewhere looks rows up by `llm_config.architectures[0]`; it never branches on family names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LLMArch:
    """How one LLM architecture is built and fine-tuned inside InternVL."""

    name: str  # llm_config.architectures[0]
    model_class: str  # "module:Class", imported on demand so the table stays plain data
    config_class: str
    lora_targets: tuple[str, ...]  # module-name suffixes handed to PEFT's target_modules
    embed_tokens: str  # input embedding inside the causal-LM class
    lm_head: str
    template: str  # conversation template of the official InternVL models with this LLM
    lora_target_parameters: tuple[str, ...] = ()  # fused expert weights (nn.Parameter, not Linear)
    per_expert_checkpoint: bool = False  # files hold one Linear per expert; transformers fuses them
    attn_implementation: str = "sdpa"  # transformers' kernel name; sdpa unless the class lacks it


_LLAMA_STYLE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
    "mlp.up_proj",
)
_ATTENTION_ONLY = _LLAMA_STYLE[:4]
_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

LLM_ARCHS: dict[str, LLMArch] = {
    row.name: row
    for row in [
        LLMArch(
            name="InternLM2ForCausalLM",
            model_class="internvl.model.internlm2:InternLM2ForCausalLM",
            config_class="internvl.model.internlm2:InternLM2Config",
            lora_targets=(
                "attention.wqkv",
                "attention.wo",
                "feed_forward.w1",
                "feed_forward.w2",
                "feed_forward.w3",
            ),
            embed_tokens="model.tok_embeddings",
            lm_head="output",
            template="internlm2-chat",
        ),
        LLMArch(
            name="LlamaForCausalLM",
            model_class="transformers:LlamaForCausalLM",
            config_class="transformers:LlamaConfig",
            lora_targets=_LLAMA_STYLE,
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="internvl2_5",
        ),
        LLMArch(
            name="Qwen2ForCausalLM",
            model_class="transformers:Qwen2ForCausalLM",
            config_class="transformers:Qwen2Config",
            lora_targets=_LLAMA_STYLE,
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="internvl2_5",
        ),
        LLMArch(
            name="Phi3ForCausalLM",
            model_class="transformers:Phi3ForCausalLM",
            config_class="transformers:Phi3Config",
            lora_targets=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="phi3-chat",
        ),
        LLMArch(
            name="Qwen3ForCausalLM",
            model_class="transformers:Qwen3ForCausalLM",
            config_class="transformers:Qwen3Config",
            lora_targets=_LLAMA_STYLE,
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="internvl2_5",
        ),
        LLMArch(
            name="Qwen3MoeForCausalLM",
            model_class="transformers:Qwen3MoeForCausalLM",
            config_class="transformers:Qwen3MoeConfig",
            lora_targets=_ATTENTION_ONLY,
            lora_target_parameters=_FUSED_EXPERTS,  # never mlp.gate: that is the router
            per_expert_checkpoint=True,
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="internvl2_5",
        ),
        LLMArch(
            name="GptOssForCausalLM",
            model_class="transformers:GptOssForCausalLM",
            config_class="transformers:GptOssConfig",
            lora_targets=_ATTENTION_ONLY,
            lora_target_parameters=_FUSED_EXPERTS,  # never mlp.router
            attn_implementation="eager",  # transformers' GPT-OSS has no sdpa path (attention sinks)
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="internvl3_5_gpt_oss",
        ),
    ]
}

VISION_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def llm_arch(name: str) -> LLMArch:
    """The table row for `llm_config.architectures[0]`; a ValueError naming the supported ones otherwise."""
    try:
        return LLM_ARCHS[name]
    except KeyError:
        supported = ", ".join(sorted(LLM_ARCHS))
        raise ValueError(f"Unsupported LLM architecture {name!r}; supported: {supported}") from None


def resolve(dotted: str) -> type:
    """Import the class named `"module:Class"`."""
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)
