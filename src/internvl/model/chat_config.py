"""`InternVLChatConfig`: the official `config.json` of an InternVL chat checkpoint, read and written as is.

One field is ours: `merged_lora`, the record of every LoRA merged into the weights (`InternVLChatModel.merge_lora`),
so that an adapter is not put onto a model that already holds it. Official readers keep unknown keys as attributes
and ignore them; a config with nothing merged does not write the key, so base configs stay as they were.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from internvl.archs import llm_arch, resolve
from internvl.model.packed_attention import packed_implementation
from internvl.model.vision import InternVisionConfig

# Official configs name attention kernels (flash_attention_2, eager) that may not be installed here; the LLM
# always runs on torch's sdpa unless the caller picks another implementation after loading.
_ATTENTION_KEYS = ("attn_implementation", "_attn_implementation")


def _current_rope_names(llm: dict) -> dict:
    """Phi-3's original releases call LongRoPE "su"; transformers 5 only knows it as "longrope"."""
    scaling = llm.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("type") == "su":
        llm["rope_scaling"] = {**scaling, "type": "longrope"}
        if "original_max_position_embeddings" in llm:
            llm["rope_scaling"].setdefault("original_max_position_embeddings", llm["original_max_position_embeddings"])
    return llm


def _legacy_rope_keys(llm: dict) -> dict:
    """Write transformers-5 `rope_parameters` back as `rope_theta` / `rope_scaling`, which older readers use."""
    params = llm.pop("rope_parameters", None)
    if not params:
        return llm
    params = dict(params)
    llm["rope_theta"] = params.pop("rope_theta", llm.get("rope_theta"))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        llm["rope_scaling"] = None
    else:
        llm["rope_scaling"] = {"type": rope_type, **params}
    return llm


class InternVLChatConfig(PretrainedConfig):
    """Configuration of an InternVL chat model: an InternViT, the `mlp1` projector and an LLM.

    Field names and defaults are the official ones, so a `config.json` written by the official code loads here
    and one written here loads there. `llm_config.architectures[0]` picks the LLM's config class from
    `internvl.archs`.
    """

    model_type = "internvl_chat"
    is_composition = True

    def __init__(
        self,
        vision_config: dict | InternVisionConfig | None = None,
        llm_config: dict | PretrainedConfig | None = None,
        use_backbone_lora: int = 0,
        use_llm_lora: int = 0,
        select_layer: int = -1,
        force_image_size: int | None = None,
        downsample_ratio: float = 0.5,
        template: str | None = None,
        dynamic_image_size: bool = False,
        use_thumbnail: bool = False,
        ps_version: str = "v1",
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        pad2square: bool = False,
        merged_lora: list[dict] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(vision_config, InternVisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = InternVisionConfig(**(vision_config or {}))
        if isinstance(llm_config, PretrainedConfig):
            self.llm_config = llm_config
        else:
            llm = dict(llm_config or {"architectures": ["InternLM2ForCausalLM"]})
            for key in _ATTENTION_KEYS:
                llm.pop(key, None)
            architectures = llm.get("architectures") or [None]
            config_class = resolve(llm_arch(architectures[0]).config_class)
            self.llm_config = config_class(**_current_rope_names(llm))
        # The architecture's kernel, with packed rows (`cu_seq_lens_q`) kept apart sample by sample.
        self.llm_config._attn_implementation = packed_implementation(
            llm_arch(self.llm_config.architectures[0]).attn_implementation)
        if ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version must be 'v1' or 'v2', got {ps_version!r}")
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.pad2square = pad2square
        self.merged_lora = list(merged_lora or [])  # [{"from": adapter folder or LoRA checkpoint, "lora": {part: r}}]
        if not self.architectures:
            self.architectures = ["InternVLChatModel"]

    @property
    def llm_architecture(self) -> str:
        """`llm_config.architectures[0]`, the key into `internvl.archs.LLM_ARCHS`."""
        return self.llm_config.architectures[0]

    @property
    def image_size(self) -> int:
        """Side of one image tile in pixels: `force_image_size`, else the ViT's own."""
        return self.force_image_size or self.vision_config.image_size

    def to_dict(self) -> dict:
        """The official `config.json` layout: nested configs as dicts, rope fields under their legacy names."""
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = _legacy_rope_keys(self.llm_config.to_dict())
        if "dtype" in output:  # official readers (transformers 4.x) look for torch_dtype
            output["torch_dtype"] = output["dtype"]
        if not output.get("merged_lora"):  # nothing merged: the official layout, and the base's hash, unchanged
            output.pop("merged_lora", None)
        return output

    def to_diff_dict(self) -> dict:
        """Always the full config: official config.json files list every field."""
        return self.to_dict()
