"""One table of facts about every LLM an InternVL chat model can carry.

Everything that differs between LLM families (which class builds it, which modules LoRA targets, what the
embedding and head are called, which conversation template the family's InternVL models use) lives here as
plain data, and so do the facts the fused training path needs (which modules form a gated MLP, which RMSNorm
class and formula, which modules read a norm's output, where rotary embedding can be replaced). Code elsewhere
looks rows up by `llm_config.architectures[0]`; it never branches on family names.
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
    # What the fused training path (`internvl.lora.fast`) may put in the place of which module. Paths are inside
    # one decoder layer of `decoder_layers`; each fact is checked against the real classes by tests/test_archs.py.
    decoder_layers: str = "model.layers"
    # (gate, up, down) LoRA-able linears whose parent computes down(act(gate(x)) * up(x)); None where the MLP is
    # not of that form over separate Linears (Phi3 packs gate and up in one; MoE experts are parameters).
    gated_mlp: tuple[str, str, str] | None = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    rms_norm_class: str | None = None  # "module:Class" of the RMSNorm, whose formula is `rms_norm`
    rms_norm: str = "llama"  # "llama": weight * normed.to(dtype); "gpt_oss": (weight * normed).to(dtype)
    # Each norm of a decoder layer whose output only these modules read (so the norm can run inside them).
    norm_readers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # A child module applying rotate-half rotary embedding as (q, k, cos, sin) -> (q, k); None where the attention
    # calls its modeling module's function (transformers' classes: nothing per instance to put in its place).
    rotary: str | None = None
    fused_loss: bool = True  # the causal-LM forward is decoder -> head -> transformers' causal-LM loss


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
_QKV_READ_NORM = ("input_layernorm", _LLAMA_STYLE[:3])
_LLAMA_NORM_READERS = (_QKV_READ_NORM, ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


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
            gated_mlp=("feed_forward.w1", "feed_forward.w3", "feed_forward.w2"),
            rms_norm_class="transformers.models.llama.modeling_llama:LlamaRMSNorm",  # InternLM2's own norm is LLaMA's
            norm_readers=(("attention_norm", ("attention.wqkv",)),
                          ("ffn_norm", ("feed_forward.w1", "feed_forward.w3"))),
            rotary="attention.rotary",
        ),
        LLMArch(
            name="LlamaForCausalLM",
            model_class="transformers:LlamaForCausalLM",
            config_class="transformers:LlamaConfig",
            lora_targets=_LLAMA_STYLE,
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="internvl2_5",
            rms_norm_class="transformers.models.llama.modeling_llama:LlamaRMSNorm",
            norm_readers=_LLAMA_NORM_READERS,
        ),
        LLMArch(
            name="Qwen2ForCausalLM",
            model_class="transformers:Qwen2ForCausalLM",
            config_class="transformers:Qwen2Config",
            lora_targets=_LLAMA_STYLE,
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="internvl2_5",
            rms_norm_class="transformers.models.qwen2.modeling_qwen2:Qwen2RMSNorm",
            norm_readers=_LLAMA_NORM_READERS,
        ),
        LLMArch(
            name="Phi3ForCausalLM",
            model_class="transformers:Phi3ForCausalLM",
            config_class="transformers:Phi3Config",
            lora_targets=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="phi3-chat",
            gated_mlp=None,  # gate and up are the halves of one gate_up_proj
            rms_norm_class="transformers.models.phi3.modeling_phi3:Phi3RMSNorm",
            norm_readers=(("input_layernorm", ("self_attn.qkv_proj",)),
                          ("post_attention_layernorm", ("mlp.gate_up_proj",))),
        ),
        LLMArch(
            name="Qwen3ForCausalLM",
            model_class="transformers:Qwen3ForCausalLM",
            config_class="transformers:Qwen3Config",
            lora_targets=_LLAMA_STYLE,
            embed_tokens="model.embed_tokens",
            lm_head="lm_head",
            template="internvl2_5",
            # also q_norm and k_norm, over each head
            rms_norm_class="transformers.models.qwen3.modeling_qwen3:Qwen3RMSNorm",
            norm_readers=_LLAMA_NORM_READERS,
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
            gated_mlp=None,  # experts
            rms_norm_class="transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeRMSNorm",
            norm_readers=(_QKV_READ_NORM,),  # the router reads the post-attention norm too
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
            gated_mlp=None,  # experts
            rms_norm_class="transformers.models.gpt_oss.modeling_gpt_oss:GptOssRMSNorm",
            rms_norm="gpt_oss",
            norm_readers=(_QKV_READ_NORM,),
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
