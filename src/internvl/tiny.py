"""Tiny InternVL models and a tiny tokenizer, built in code with no download.

They are real models (every architecture of `internvl.archs`, both InternViT styles) at a few hundred thousand
parameters: what the tests run on, and the starting point of the embedded demo.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from internvl.archs import llm_arch
from internvl.data.templates import TEMPLATE_NAMES, get_conv_template
from internvl.data.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.model.chat_config import InternVLChatConfig

# The end-of-turn and role markers of every template, so one tokenizer serves every architecture.
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>",
                       "<|end|>", "<s>", "</s>"]
IMAGE_SPECIAL_TOKENS = [IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>",
                        "<box>", "</box>"]

_CORPUS = [
    "What colour is the shape? The shape is red. What shape is it? It is a circle.",
    "Describe the image. A blue square on a white background, next to a green triangle.",
    "You are a helpful assistant. user assistant system Please answer the question.",
    "Quelle est la couleur? rouge, bleu, vert, jaune. The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 yes no left right top bottom large small image picture photo",
]

VISION_STYLES = {
    # InternViT-300M: LayerNorm, qkv bias, no qk-norm.
    "300M": dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
    # InternViT-6B: RMSNorm, qk-norm, no qkv bias.
    "6B": dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
}

_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY_LLMS: dict[str, dict] = {
    "InternLM2ForCausalLM": dict(model_type="internlm2", bias=False, rope_theta=1000000.0),
    "LlamaForCausalLM": dict(model_type="llama", rope_theta=500000.0),
    "Qwen2ForCausalLM": dict(model_type="qwen2", rope_theta=1000000.0),
    "Phi3ForCausalLM": dict(model_type="phi3", rope_theta=10000.0, pad_token_id=0),
    "Qwen3ForCausalLM": dict(model_type="qwen3", head_dim=16, rope_theta=1000000.0),
    "Qwen3MoeForCausalLM": dict(model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, decoder_sparse_step=1, rope_theta=1000000.0),
    "GptOssForCausalLM": dict(model_type="gpt_oss", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                              sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                              rope_theta=150000.0),
}


def tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in milliseconds, with every chat and image special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The default system messages are in every prompt: learning them keeps tiny prompts short.
    system_messages = [get_conv_template(name).system_message for name in TEMPLATE_NAMES]
    tokenizer.train_from_iterator(_CORPUS + system_messages * 4, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=4096
    )
    wrapped.add_tokens(IMAGE_SPECIAL_TOKENS, special_tokens=True)
    return wrapped


def tiny_config(
    llm_architecture: str = "Qwen2ForCausalLM",
    vision_style: str = "300M",
    vocab_size: int = 640,
    image_size: int = 56,
    **overrides,
) -> InternVLChatConfig:
    """An `InternVLChatConfig` of a tiny model: 2-layer ViT (patch 14) and 2-layer LLM of hidden size 64."""
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=14, layer_norm_eps=1e-6, drop_path_rate=0.0, **VISION_STYLES[vision_style],
    )
    llm = dict(_SHAPE, architectures=[llm_architecture], vocab_size=vocab_size, **TINY_LLMS[llm_architecture])
    fields = dict(
        vision_config=vision, llm_config=llm, force_image_size=image_size, downsample_ratio=0.5,
        ps_version="v2", select_layer=-1, template=llm_arch(llm_architecture).template, dynamic_image_size=True,
        use_thumbnail=True, max_dynamic_patch=6,
    )
    fields.update(overrides)
    return InternVLChatConfig(**fields)
