"""transformers' native InternVL format ("-hf"), mapped to and from the official one, as tables.

A "-hf" folder is what `InternVLForConditionalGeneration.save_pretrained` writes (`model_type: internvl`). Its
weights differ from the official ones by the names and splits in `RENAMES` (and, for InternLM2 LLMs, which
transformers holds as LLaMA, `INTERNLM2_RENAMES`); its config by `VISION_FIELDS`, `INTERNLM2_FIELDS` and the
top-level fields of `hf_config`. Everything here is plain data and pure functions on dicts of tensors and config
dicts: reading and writing folders is `internvl.checkpoint`'s and `internvl.convert`'s.

Weight names come in two spellings that transformers reads alike: the one it writes
(`language_model.model.*`, `vision_tower.*`) and its live module names (`model.language_model.*`,
`model.vision_tower.*`, `lm_head`), which PEFT adapters of the whole model use. `LIVE_PREFIXES` maps one to the
other. Official-format fields with no "-hf" counterpart (template, tiling, the LLM's original architecture) are
kept in the "-hf" config under `EXTRAS_KEY`, so that original -> hf -> original gives back the same model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from internvl.archs import LLM_ARCHS, llm_arch, resolve

HF_MODEL_TYPE = "internvl"
HF_ARCHITECTURE = "InternVLForConditionalGeneration"
EXTRAS_KEY = "internvl_chat"  # official fields "-hf" has no place for; transformers keeps unknown keys as they are
FORMATS = ("original", "hf")
# transformers' vision qk-norm is an RMSNorm of fixed epsilon (`InternVLVisionRMSNorm` built with its default).
HF_QK_NORM_EPS = 1e-6


@dataclass(frozen=True)
class Rename:
    """One weight of the official format and its name (or, for a packed projection, its three names) in "-hf".

    Patterns hold `{n}` (a layer index), `{p}` (weight or bias) and `{rest}` (any remaining key). `split` says how
    a packed tensor's rows become q, k and v: "thirds" (InternViT's `qkv`) or "kv_groups" (InternLM2's `wqkv`,
    laid out per key-value group, see `internvl.model.internlm2.InternLM2Attention`).
    """

    original: str
    hf: str | tuple[str, str, str]
    split: str | None = None


_VIT, _HF_VIT = "vision_model.encoder.layers.{n}.", "vision_tower.encoder.layer.{n}."
RENAMES: tuple[Rename, ...] = (
    Rename("vision_model.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
    Rename("vision_model.embeddings.patch_embedding.{p}", "vision_tower.embeddings.patch_embeddings.projection.{p}"),
    Rename("vision_model.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
    Rename(_VIT + "attn.qkv.{p}", tuple(_HF_VIT + f"attention.{x}_proj.{{p}}" for x in "qkv"), split="thirds"),
    Rename(_VIT + "attn.q_norm.weight", _HF_VIT + "attention.q_norm.weight"),
    Rename(_VIT + "attn.k_norm.weight", _HF_VIT + "attention.k_norm.weight"),
    Rename(_VIT + "attn.proj.{p}", _HF_VIT + "attention.projection_layer.{p}"),
    Rename(_VIT + "mlp.fc1.{p}", _HF_VIT + "mlp.fc1.{p}"),
    Rename(_VIT + "mlp.fc2.{p}", _HF_VIT + "mlp.fc2.{p}"),
    Rename(_VIT + "norm1.{p}", _HF_VIT + "layernorm_before.{p}"),
    Rename(_VIT + "norm2.{p}", _HF_VIT + "layernorm_after.{p}"),
    Rename(_VIT + "ls1", _HF_VIT + "lambda_1"),
    Rename(_VIT + "ls2", _HF_VIT + "lambda_2"),
    Rename("mlp1.0.{p}", "multi_modal_projector.layer_norm.{p}"),
    Rename("mlp1.1.{p}", "multi_modal_projector.linear_1.{p}"),
    Rename("mlp1.3.{p}", "multi_modal_projector.linear_2.{p}"),
    # transformers' own LLM classes: the same names in both formats.
    Rename("language_model.{rest}", "language_model.{rest}"),
)

_LM, _LLAMA = "language_model.model.layers.{n}.", "language_model.model.layers.{n}."
# InternLM2 held as LLaMA (internvl.model.internlm2's docstring has the correspondence); before `RENAMES`' catch-all.
INTERNLM2_RENAMES: tuple[Rename, ...] = (
    Rename("language_model.model.tok_embeddings.weight", "language_model.model.embed_tokens.weight"),
    Rename(_LM + "attention.wqkv.{p}", tuple(_LLAMA + f"self_attn.{x}_proj.{{p}}" for x in "qkv"), split="kv_groups"),
    Rename(_LM + "attention.wo.{p}", _LLAMA + "self_attn.o_proj.{p}"),
    Rename(_LM + "feed_forward.w1.weight", _LLAMA + "mlp.gate_proj.weight"),
    Rename(_LM + "feed_forward.w3.weight", _LLAMA + "mlp.up_proj.weight"),
    Rename(_LM + "feed_forward.w2.weight", _LLAMA + "mlp.down_proj.weight"),
    Rename(_LM + "attention_norm.weight", _LLAMA + "input_layernorm.weight"),
    Rename(_LM + "ffn_norm.weight", _LLAMA + "post_attention_layernorm.weight"),
    Rename("language_model.output.weight", "language_model.lm_head.weight"),
)

# The spelling transformers writes -> its live module names (what PEFT adapters of the whole model are keyed by).
LIVE_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)

# InternViT's official `vision_config` field -> `InternVLVisionConfig`'s.
VISION_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "norm_type": "norm_type",
    "qk_normalization": "use_qk_norm",
    "qkv_bias": "attention_bias",
    "initializer_factor": "layer_scale_init_value",
    "initializer_range": "initializer_range",
    "attention_dropout": "attention_dropout",
    "dropout": "projection_dropout",
}
# Training-only InternViT fields transformers has no place for; kept among the extras.
VISION_EXTRAS = ("drop_path_rate", "use_flash_attn")
# InternLM2's `llm_config` field -> `LlamaConfig`'s (rope fields are mapped by `_internlm2_rope` / `_llama_rope`).
INTERNLM2_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "hidden_act": "hidden_act",
    "max_position_embeddings": "max_position_embeddings",
    "initializer_range": "initializer_range",
    "rms_norm_eps": "rms_norm_eps",
    "use_cache": "use_cache",
    "bias": "attention_bias",  # InternLM2's bias is on wqkv and wo: LLaMA's attention_bias covers q, k, v and o
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
# Official top-level fields "-hf" has no place for (it always shuffles pixels as ps_version v2).
TOP_LEVEL_EXTRAS = ("template", "force_image_size", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch",
                    "max_dynamic_patch", "pad2square", "merged_lora")


class NotConvertible(ValueError):
    """A model, config or adapter that the other format cannot hold, with the reason."""


# ----- weights ----------------------------------------------------------------------------------------------

_PLACEHOLDERS = {"{n}": r"(?P<n>\d+)", "{p}": r"(?P<p>weight|bias)", "{rest}": r"(?P<rest>.+)"}


def _regex(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    for placeholder, group in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape(placeholder), group)
    return re.compile(regex + "$")


def _fill(pattern: str, groups: dict) -> str:
    return pattern.format(**groups)


def _renames(llm_architecture: str) -> tuple[Rename, ...]:
    return (INTERNLM2_RENAMES if llm_architecture == "InternLM2ForCausalLM" else ()) + RENAMES


def _hf_names(rename: Rename) -> tuple[str, ...]:
    return rename.hf if isinstance(rename.hf, tuple) else (rename.hf,)


def split_packed(tensor: torch.Tensor, split: str, llm_config: dict) -> tuple[torch.Tensor, ...]:
    """The q, k and v rows of a packed projection's weight, bias or LoRA B (rows are outputs)."""
    if split == "thirds":
        return tuple(tensor.chunk(3, dim=0))
    heads, kv_heads = llm_config["num_attention_heads"], llm_config["num_key_value_heads"]
    groups, head_dim = heads // kv_heads, llm_config["hidden_size"] // heads
    grouped = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])  # [kv, g + 2, D, (in)]
    rest = tensor.shape[1:]
    return (grouped[:, :groups].reshape(heads * head_dim, *rest), grouped[:, groups].reshape(kv_heads * head_dim, *rest),
            grouped[:, groups + 1].reshape(kv_heads * head_dim, *rest))


def join_packed(parts: tuple[torch.Tensor, ...], split: str, llm_config: dict) -> torch.Tensor:
    """Inverse of `split_packed`."""
    if split == "thirds":
        return torch.cat(parts, dim=0)
    heads, kv_heads = llm_config["num_attention_heads"], llm_config["num_key_value_heads"]
    groups, head_dim = heads // kv_heads, llm_config["hidden_size"] // heads
    q, k, v = parts
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(kv_heads, groups, head_dim, *rest), k.reshape(kv_heads, 1, head_dim, *rest),
                         v.reshape(kv_heads, 1, head_dim, *rest)], dim=1)  # [kv, g + 2, D, (in)]
    return grouped.reshape(-1, *rest)


def hf_names(key: str, llm_architecture: str) -> tuple[tuple[str, ...], Rename]:
    """The "-hf" name(s) of an official weight name (three for a packed q/k/v), and the rule that gave them."""
    for rename in _renames(llm_architecture):
        match = _regex(rename.original).match(key)
        if match:
            return tuple(_fill(name, match.groupdict()) for name in _hf_names(rename)), rename
    raise NotConvertible(f"weight {key} has no counterpart in transformers' InternVL")


def original_name(key: str, llm_architecture: str) -> tuple[str, int, Rename]:
    """The official name of a "-hf" weight name, which of the packed parts it is (0 when not packed), and the rule."""
    for rename in _renames(llm_architecture):
        for part, name in enumerate(_hf_names(rename)):
            match = _regex(name).match(key)
            if match:
                return _fill(rename.original, match.groupdict()), part, rename
    raise NotConvertible(f"weight {key} has no counterpart in the official InternVL format")


def to_written_names(state: dict) -> dict:
    """Keys in transformers' live module spelling (`model.language_model.*`) -> the spelling it writes."""
    out = {}
    for key, value in state.items():
        for written, live in LIVE_PREFIXES:
            if key.startswith(live):
                key = written + key[len(live):]
                break
        out[key] = value
    return out


def live_name(key: str) -> str:
    """A written "-hf" weight name in transformers' live module spelling."""
    for written, live in LIVE_PREFIXES:
        if key.startswith(written):
            return live + key[len(written):]
    return key


def hf_state(state: dict[str, torch.Tensor], llm_config: dict) -> dict[str, torch.Tensor]:
    """Official-format weights -> "-hf" weights as transformers writes them; packed q/k/v split exactly."""
    architecture = llm_config["architectures"][0]
    out = {}
    for key, tensor in state.items():
        names, rename = hf_names(key, architecture)
        parts = split_packed(tensor, rename.split, llm_config) if rename.split else (tensor,)
        out.update(zip(names, (part.contiguous() for part in parts)))
    return out


def original_state(state: dict[str, torch.Tensor], llm_config: dict) -> dict[str, torch.Tensor]:
    """"-hf" weights (either spelling) -> official-format weights; q/k/v joined back into the packed projection."""
    architecture = llm_config["architectures"][0]
    out, packed = {}, {}
    for key, tensor in to_written_names(state).items():
        name, part, rename = original_name(key, architecture)
        if rename.split:
            packed.setdefault(name, [None, None, None])[part] = tensor
            packed[name].append(rename)
        else:
            out[name] = tensor
    for name, (q, k, v, rename, *_) in packed.items():
        if q is None or k is None or v is None:
            raise NotConvertible(f"{name}: the checkpoint lacks one of its q/k/v parts")
        out[name] = join_packed((q, k, v), rename.split, llm_config)
    return out


# ----- config -----------------------------------------------------------------------------------------------

def _model_type(architecture: str) -> str:
    return resolve(llm_arch(architecture).config_class).model_type


def _architecture_of(model_type: str) -> str:
    """The arch table's row whose config class has `model_type` (InternLM2's LLaMA comes back as LLaMA)."""
    for name in LLM_ARCHS:
        if name != "InternLM2ForCausalLM" and _model_type(name) == model_type:
            return name
    raise NotConvertible(f"text_config.model_type {model_type!r} is no LLM an InternVL chat model holds; supported: "
                         + ", ".join(sorted(_model_type(n) for n in LLM_ARCHS if n != "InternLM2ForCausalLM")))


def _internlm2_as_llama(llm: dict) -> dict:
    """InternLM2's `llm_config` as the `LlamaConfig` dict transformers' InternVL holds it as."""
    text = {hf: llm[field] for field, hf in INTERNLM2_FIELDS.items() if field in llm}
    text.update(model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=False,
                head_dim=llm["hidden_size"] // llm["num_attention_heads"])
    scaling = llm.get("rope_scaling")
    text["rope_parameters"] = {"rope_type": "default" if not scaling else scaling["type"],
                               "rope_theta": llm.get("rope_theta", 10000), **({"factor": scaling["factor"]}
                                                                              if scaling else {})}
    return text


def _llama_as_internlm2(text: dict) -> dict:
    """Inverse of `_internlm2_as_llama`."""
    llm = {field: text[hf] for field, hf in INTERNLM2_FIELDS.items() if hf in text}
    rope = dict(text.get("rope_parameters") or {})
    llm["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 10000))
    rope_type = rope.get("rope_type", "default")
    llm["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, "factor": rope["factor"]}
    llm.update(model_type="internlm2", architectures=["InternLM2ForCausalLM"])
    return llm


def num_image_tokens(config: dict) -> int:
    """Tokens per tile of an official config: (tile / patch)^2 * downsample_ratio^2."""
    vision = config["vision_config"]
    side = (config.get("force_image_size") or vision["image_size"]) // vision["patch_size"]
    return int(side * side * config.get("downsample_ratio", 0.5) ** 2)


def check_hf_convertible(config: dict) -> None:
    """Raise `NotConvertible` with the reason when transformers' InternVL cannot hold this official model."""
    vision = config["vision_config"]
    if config.get("ps_version", "v1") != "v2":
        raise NotConvertible("ps_version is 'v1': transformers' InternVL shuffles pixels as 'v2' only (the v1 "
                             "models' features come out transposed there)")
    if config.get("use_llm_lora") or config.get("use_backbone_lora"):
        raise NotConvertible("the checkpoint carries LoRA (use_llm_lora / use_backbone_lora set); merge it first "
                             "(`internvl-lora merge`)")
    if vision.get("qk_normalization") and vision.get("layer_norm_eps", 1e-6) != HF_QK_NORM_EPS:
        raise NotConvertible(f"the ViT's qk-norm epsilon is {vision.get('layer_norm_eps')}; transformers' InternVL "
                             f"fixes it at {HF_QK_NORM_EPS}")
    if config["llm_config"]["architectures"][0] == "InternLM2ForCausalLM":
        scaling = config["llm_config"].get("rope_scaling")
        if scaling and scaling.get("type") not in ("linear", "dynamic"):
            raise NotConvertible(f"InternLM2 rope_scaling {scaling!r} has no LLaMA counterpart")


def hf_config(config: dict, image_token_id: int) -> dict:
    """An official `config.json` dict -> transformers' `InternVLConfig` dict (refused with the reason where
    transformers cannot hold the model). `image_token_id` is the tokenizer's `<IMG_CONTEXT>` id."""
    check_hf_convertible(config)
    vision, llm = config["vision_config"], dict(config["llm_config"])
    architecture = llm["architectures"][0]
    text = _internlm2_as_llama(llm) if architecture == "InternLM2ForCausalLM" else llm
    text.setdefault("model_type", _model_type(architecture))
    extras = {key: config[key] for key in TOP_LEVEL_EXTRAS if config.get(key) is not None}
    extras["vision"] = {key: vision[key] for key in VISION_EXTRAS if key in vision}
    if architecture == "InternLM2ForCausalLM":
        extras["llm_architecture"] = architecture
    out = {
        "model_type": HF_MODEL_TYPE,
        "architectures": [HF_ARCHITECTURE],
        "vision_config": {"model_type": "internvl_vision", "use_mean_pooling": True, "use_mask_token": False,
                          "use_absolute_position_embeddings": True,
                          **{hf: vision[field] for field, hf in VISION_FIELDS.items() if field in vision}},
        "text_config": text,
        "image_token_id": image_token_id,
        "image_seq_length": num_image_tokens(config),
        "downsample_ratio": config.get("downsample_ratio", 0.5),
        "vision_feature_layer": config.get("select_layer", -1),
        "vision_feature_select_strategy": "default",  # the class token dropped, as InternVL does
        "projector_hidden_act": "gelu",
        # InternVLConfig defaults to tied, which would overwrite an untied head with the embeddings on load.
        "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
        EXTRAS_KEY: extras,
    }
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype:
        out["dtype"] = dtype
    return out


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def original_config(config: dict) -> dict:
    """A transformers `InternVLConfig` dict (a "-hf" `config.json`) -> the official `config.json` dict."""
    vision, text = config.get("vision_config") or {}, dict(config.get("text_config") or {})
    extras = config.get(EXTRAS_KEY) or {}
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise NotConvertible("vision_feature_select_strategy is not 'default': InternVL always drops the class token")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise NotConvertible(f"projector_hidden_act {config['projector_hidden_act']!r}: InternVL's projector uses GELU")
    if vision.get("use_mean_pooling") is False:
        raise NotConvertible("vision_config.use_mean_pooling is False: InternViT has no final LayerNorm")
    if isinstance(config.get("vision_feature_layer", -1), list):
        raise NotConvertible("vision_feature_layer is a list: InternVL takes one ViT layer")
    architecture = extras.get("llm_architecture") or _architecture_of(text.get("model_type", "qwen2"))
    if architecture == "InternLM2ForCausalLM":
        llm = _llama_as_internlm2(text)
    else:
        llm = {**text, "architectures": [architecture]}
    inverse = {hf: field for field, hf in VISION_FIELDS.items()}
    official_vision = {inverse[key]: value for key, value in vision.items() if key in inverse}
    official_vision["image_size"] = _first(official_vision.get("image_size", 448))
    official_vision["patch_size"] = _first(official_vision.get("patch_size", 14))
    official_vision.update(extras.get("vision", {}))
    out = {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "vision_config": official_vision,
        "llm_config": llm,
        "select_layer": config.get("vision_feature_layer", -1),
        "downsample_ratio": config.get("downsample_ratio", 0.5),
        "ps_version": "v2",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        **{key: extras[key] for key in TOP_LEVEL_EXTRAS if key in extras},
    }
    out.setdefault("force_image_size", official_vision["image_size"])
    # transformers ties the head by the top-level field (True by default), whatever text_config says.
    out["llm_config"]["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", True))
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype:
        out["torch_dtype"] = dtype
    return out


# ----- LoRA adapters ----------------------------------------------------------------------------------------
# PEFT keys an adapter `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. Ours are of one part of the
# official model (`llm_adapter/`: the LLM, `vision_adapter/`: the ViT); "-hf" ones of the whole
# `InternVLForConditionalGeneration` (live module names). A LoRA on a packed q/k/v (delta = B @ A) is exactly three
# LoRAs sharing A, with B's rows split as the weight's are; the reverse is exact only where they share one A.

PEFT_PREFIX = "base_model.model."
PARTS = {"language_model": "language_model.", "vision_model": "vision_model."}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_LAYER = re.compile(r"\.(layers|layer)\.\d+\.")


def _lora_key(key: str, path: str) -> re.Match:
    match = _LORA_KEY.match(key)
    if not match:
        raise NotConvertible(f"{path}: {key} is not a plain LoRA weight (lora_A / lora_B); DoRA magnitudes, LoRA "
                             "biases, embedding LoRA and modules_to_save have no exact counterpart")
    return match


def hf_adapter_state(state: dict[str, torch.Tensor], part: str, llm_config: dict, path: str = "adapter"
                     ) -> dict[str, torch.Tensor]:
    """Our adapter of `part` ("language_model" or "vision_model") -> a PEFT adapter of transformers' whole
    `InternVLForConditionalGeneration`; a packed q/k/v LoRA becomes three sharing its A."""
    architecture = llm_config["architectures"][0]
    out = {}
    for key, tensor in state.items():
        match = _lora_key(key, path)
        names, rename = hf_names(f"{PARTS[part]}{match['module']}.weight", architecture)
        if rename.split and match["which"] == "lora_B":
            tensors = split_packed(tensor, rename.split, llm_config)
        else:
            tensors = tuple(tensor.clone() for _ in names)  # one A each: a file stores no shared tensors
        for name, value in zip(names, tensors):
            out[f"{PEFT_PREFIX}{live_name(name).removesuffix('.weight')}.{match['which']}.weight"] = value.contiguous()
    return out


def original_adapter_states(state: dict[str, torch.Tensor], llm_config: dict, path: str = "adapter"
                            ) -> dict[str, dict[str, torch.Tensor]]:
    """A PEFT adapter of transformers' whole InternVL -> ours, per part; refused where that is not exact (q/k/v
    adapters with different A, a LoRA on the projector)."""
    architecture = llm_config["architectures"][0]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    packed: dict[tuple[str, str], dict] = {}
    for key, tensor in state.items():
        match = _lora_key(key, path)
        written = next(iter(to_written_names({f"{match['module']}.weight": None})))
        name, index, rename = original_name(written, architecture)
        part = next((p for p, prefix in PARTS.items() if name.startswith(prefix)), None)
        if part is None:
            raise NotConvertible(f"{path}: {key} is a LoRA on {name.rsplit('.', 1)[0]}, which our adapters do not "
                                 "hold (only the LLM and the ViT); merge it into the model instead")
        module = name[len(PARTS[part]):].removesuffix(".weight")
        if rename.split:
            entry = packed.setdefault((part, module), {"rename": rename, "lora_A": {}, "lora_B": {}})
            entry[match["which"]][index] = tensor
        else:
            parts.setdefault(part, {})[f"{PEFT_PREFIX}{module}.{match['which']}.weight"] = tensor
    for (part, module), entry in packed.items():
        a_parts = list(entry["lora_A"].values())
        if any(not torch.equal(a, a_parts[0]) for a in a_parts) or set(entry["lora_A"]) != set(entry["lora_B"]):
            raise NotConvertible(f"{path}: the q/k/v LoRAs of {module} do not share one A, so no single LoRA on "
                                 "the packed projection equals them; merge it into the model instead")
        rank, rows = a_parts[0].shape[0], _part_rows(entry["rename"].split, llm_config, a_parts[0].shape[1])
        # A projection the adapter leaves out gets B = 0: exactly no change, as its absence meant.
        b_parts = tuple(entry["lora_B"].get(i, torch.zeros(n, rank, dtype=a_parts[0].dtype)) for i, n in enumerate(rows))
        parts.setdefault(part, {})[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a_parts[0]
        parts[part][f"{PEFT_PREFIX}{module}.lora_B.weight"] = join_packed(b_parts, entry["rename"].split, llm_config)
    return parts


def _part_rows(split: str, llm_config: dict, in_features: int) -> tuple[int, int, int]:
    """Output rows of q, k and v in a packed projection."""
    if split == "thirds":
        return (in_features,) * 3
    heads, kv_heads = llm_config["num_attention_heads"], llm_config["num_key_value_heads"]
    head_dim = llm_config["hidden_size"] // heads
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def module_suffix(module: str) -> str:
    """A module's name below its decoder or encoder layer (`attention.wqkv`), or the whole name outside layers."""
    parts = _LAYER.split(module)
    return parts[-1] if len(parts) > 1 else module


def check_plain_lora(config: dict, path: str = "adapter_config.json") -> None:
    """Refuse adapter settings whose meaning depends on module names we rename or split."""
    for field, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("modules_to_save", "modules_to_save"),
                        ("layers_to_transform", "layers_to_transform"), ("rank_pattern", "rank_pattern"),
                        ("alpha_pattern", "alpha_pattern"), ("trainable_token_indices", "trainable tokens")):
        if config.get(field):
            raise NotConvertible(f"{path}: {what} ({field}) has no exact counterpart in the other format")


def hf_target_modules(state: dict[str, torch.Tensor]) -> str:
    """PEFT's `target_modules` for a "-hf" adapter: a regex of exactly the modules it holds (layer index free), so
    that it attaches to its part of the whole model and nowhere else."""
    modules = {_LORA_KEY.match(key)["module"] for key in state}
    patterns = sorted({re.sub(r"\\\.(\d+)\\\.", r"\\.\\d+\\.", re.escape(module)) for module in modules})
    return "(" + "|".join(patterns) + ")"


def original_target_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """PEFT's `target_modules` for one of our adapters: the layer-relative module names it holds."""
    return sorted({module_suffix(_LORA_KEY.match(key)["module"]) for key in state})
