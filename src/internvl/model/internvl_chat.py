"""`InternVLChatModel`: InternViT + `mlp1` projector + an LLM, as the official InternVL chat models.

The import path, constructor, forward signature, `generate`, `chat`, `wrap_llm_lora` and `wrap_backbone_lora`
follow the official `modeling_internvl_chat.py`, so official scripts run unchanged. Checkpoints load through
`internvl.checkpoint`, which reads the official folder format and executes nothing found in it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.hub import convert_file_size_to_int

from internvl import checkpoint, hf_format
from internvl.archs import VISION_LORA_TARGETS, llm_arch, resolve
from internvl.data.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.data.templates import get_conv_template
from internvl.lora.inject import ParamCounts, add_lora, count_params
from internvl.lora.loss import linear_cross_entropy
from internvl.lora.merge import merge_lora
from internvl.model.chat_config import InternVLChatConfig
from internvl.model.projector import build_mlp1, num_image_tokens, pixel_shuffle
from internvl.model.vision import InternVisionConfig, InternVisionModel

__all__ = ["InternVLChatConfig", "InternVLChatModel", "InternVisionConfig", "InternVisionModel"]

# Keyword arguments of the official / transformers loaders that mean nothing here (no remote code is ever run;
# weights are always read lazily; the attention kernel is sdpa).
_IGNORED_LOAD_OPTIONS = {"trust_remote_code", "low_cpu_mem_usage", "use_flash_attn", "use_safetensors", "revision"}


OFFICIAL_DROPOUT = 0.05  # the official trainer's LoRA dropout


def decode_answers(tokenizer, output_ids: torch.Tensor, template) -> list[str]:
    """Generated ids [B, T] -> one answer per row, as `chat` answers: the template's answer header (GPT-OSS's
    channel) dropped, special tokens dropped, cut at the end-of-turn token (a tokenizer may not count it as
    special), stripped."""
    header = tokenizer(template.answer_header, add_special_tokens=False)["input_ids"]
    answers = []
    for ids in output_ids:
        if header and ids[: len(header)].tolist() == header:
            ids = ids[len(header):]
        answers.append(tokenizer.decode(ids, skip_special_tokens=True).split(template.stop_token)[0].strip())
    return answers


class InternVLChatModel(PreTrainedModel):
    """An InternVL chat model. Build it from an `InternVLChatConfig` or load it with `from_pretrained(folder)`."""

    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: InternVLChatConfig, vision_model=None, language_model=None):
        super().__init__(config)
        self.arch = llm_arch(config.llm_architecture)
        self.select_layer = config.select_layer
        self.template = config.template or self.arch.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = num_image_tokens(
            config.image_size, config.vision_config.patch_size, config.downsample_ratio
        )
        self.vision_model = vision_model or InternVisionModel(config.vision_config)
        self.language_model = language_model or resolve(self.arch.model_class)(config.llm_config)
        # The parts' own layer classes, and only those: FSDP's auto-wrap (and device maps) refuse a listed class
        # the model does not hold.
        self._no_split_modules = [*self.vision_model._no_split_modules, *(self.language_model._no_split_modules or [])]
        self.mlp1 = build_mlp1(
            config.vision_config.hidden_size, config.llm_config.hidden_size, config.downsample_ratio
        )
        self.img_context_token_id = None  # set by the caller from its tokenizer, as in the official code
        # The format the weights were read in ("original" or transformers' "hf"): what adapters and merged models of
        # this model are written in.
        self.checkpoint_format = "original"
        self.conv_template = get_conv_template(self.template)
        self.system_message = self.conv_template.system_message
        # Official LoRA checkpoints hold PEFT's key names: wrap before any weight is read.
        if config.use_backbone_lora:
            self.wrap_backbone_lora(r=config.use_backbone_lora, lora_alpha=2 * config.use_backbone_lora,
                                    verbose=False)
        if config.use_llm_lora:
            self.wrap_llm_lora(r=config.use_llm_lora, lora_alpha=2 * config.use_llm_lora, verbose=False)

    def _init_weights(self, module):
        # The ViT and the LLM initialise themselves; only the projector is ours.
        if isinstance(module, nn.Linear) and any(module is m for m in self.mlp1.modules()):
            nn.init.normal_(module.weight, std=self.config.llm_config.initializer_range)
            nn.init.zeros_(module.bias)

    # ----- LoRA -------------------------------------------------------------------------------------------

    def wrap_llm_lora(
        self, r: int = 128, lora_alpha: int = 256, lora_dropout: float | None = None, *, target_modules=None,
        verbose: bool = True, **peft_options,
    ) -> ParamCounts:
        """Wrap the LLM in PEFT LoRA on its architecture's targets; only LoRA weights stay trainable.

        `lora_dropout` None: the official 0.05, or 0 for LLMs whose fused expert weights PEFT adapts without
        dropout (Qwen3-MoE, GPT-OSS). `target_modules` overrides the table's targets; `peft_options`
        (`use_dora`, `use_rslora`, `init_lora_weights`, ...) go to `peft.LoraConfig`. Sets
        `config.use_llm_lora = r` and returns (and prints) the LLM's trainable and total parameter counts.
        """
        target_parameters = self.arch.lora_target_parameters if target_modules is None else ()
        if lora_dropout is None:
            lora_dropout = 0.0 if target_parameters else OFFICIAL_DROPOUT
        self.language_model = add_lora(
            self.language_model,
            self.arch.lora_targets if target_modules is None else target_modules,
            target_parameters=target_parameters,
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM", **peft_options,
        )
        # Under gradient checkpointing a frozen embedding would cut the graph before the first LoRA layer.
        self.language_model.enable_input_require_grads()
        self.config.use_llm_lora = r
        counts = count_params(self.language_model)
        if verbose:
            print(f"LLM LoRA r={r}: {counts}")
        return counts

    def wrap_backbone_lora(
        self, r: int = 128, lora_alpha: int = 256, lora_dropout: float | None = None, *, target_modules=None,
        verbose: bool = True, **peft_options,
    ) -> ParamCounts:
        """Wrap the InternViT in PEFT LoRA on `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2` (`lora_dropout` None:
        the official 0.05)."""
        self.vision_model = add_lora(
            self.vision_model,
            VISION_LORA_TARGETS if target_modules is None else target_modules,
            r=r, lora_alpha=lora_alpha, lora_dropout=OFFICIAL_DROPOUT if lora_dropout is None else lora_dropout,
            **peft_options,
        )
        self.config.use_backbone_lora = r
        counts = count_params(self.vision_model)
        if verbose:
            print(f"ViT LoRA r={r}: {counts}")
        return counts

    def merge_lora(self, source: str | os.PathLike | None = None) -> dict:
        """Fold every LoRA adapter into its base weights, unwrap the parts and set `use_*_lora` to 0.

        The merge is recorded in `config.merged_lora` (`source`: the adapter folder or LoRA checkpoint merged), so
        that the adapter is not put onto the merged model again: its LoRA would count twice. Returns the record.
        """
        ranks = {"vision_model": self.config.use_backbone_lora, "language_model": self.config.use_llm_lora}
        self.vision_model = merge_lora(self.vision_model)
        self.language_model = merge_lora(self.language_model)
        self.config.use_backbone_lora = 0
        self.config.use_llm_lora = 0
        record = {"from": None if source is None else str(source), "lora": {p: r for p, r in ranks.items() if r}}
        self.config.merged_lora = [*self.config.merged_lora, record]
        return record

    # ----- forward ----------------------------------------------------------------------------------------

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tiles [N, 3, H, W] -> LLM-space features [N, num_image_token, llm_hidden]."""
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        else:
            outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            vit_embeds = outputs.hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]  # drop the class token: [N, h*w, C]
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)  # [N, h, w, C]
        vit_embeds = pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio, ps_version=self.ps_version)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])  # [N, h*w*r^2, C/r^2]
        return self.mlp1(vit_embeds)

    def _embed_with_images(self, input_ids: torch.Tensor, vit_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each `<IMG_CONTEXT>` position replaced, in order, by one image feature."""
        input_embeds = self.language_model.get_input_embeddings()(input_ids)  # [B, T, H]
        if vit_embeds is None:
            return input_embeds
        if self.img_context_token_id is None:
            raise ValueError(
                "model.img_context_token_id is not set: set it to tokenizer.convert_tokens_to_ids"
                f"('{IMG_CONTEXT_TOKEN}') before calling the model with images"
            )
        selected = input_ids == self.img_context_token_id  # [B, T]
        features = vit_embeds.reshape(-1, vit_embeds.shape[-1])
        if int(selected.sum()) != features.shape[0]:
            raise ValueError(
                f"the input has {int(selected.sum())} {IMG_CONTEXT_TOKEN} positions but the images give "
                f"{features.shape[0]} features ({vit_embeds.shape[0]} tiles x {self.num_image_token} tokens); "
                "each <image> must expand to num_image_token x tiles context tokens"
            )
        return input_embeds.masked_scatter(selected.unsqueeze(-1), features.to(input_embeds.dtype))

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        image_flags: torch.LongTensor | None = None,
        past_key_values=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """The official training forward: images into the `<IMG_CONTEXT>` slots, next-token loss on `labels`.

        `image_flags` ([N] or [N, 1]) marks the real tiles of `pixel_values`; tiles flagged 0 (the dummy tile of
        a text-only sample) run through the ViT but feed nothing to the LLM. A packed batch (one row of several
        samples, as `Collator(pack=True)` makes it) gives `cu_seqlens` and positions restarting per sample: each
        sample then attends only to itself. `loss_weight` (per label, as the official one) makes the loss
        sum(w * ce) / sum(w), with the Trainer's `num_items_in_batch` as the divisor when given.
        """
        vit_embeds = all_tiles = None
        if pixel_values is not None:
            vit_embeds = all_tiles = self.extract_feature(pixel_values)  # [N, num_image_token, llm_hidden]
            if image_flags is not None:
                vit_embeds = all_tiles[image_flags.reshape(-1) == 1]
        inputs_embeds = self._embed_with_images(input_ids, vit_embeds)
        if vit_embeds is not None and vit_embeds.shape[0] == 0:
            # A text-only batch: keep the ViT and projector in the graph (zero gradients), so that every trainable
            # weight is used on every rank as DDP and ZeRO expect.
            inputs_embeds = inputs_embeds + 0.0 * all_tiles.sum()
        if past_key_values is not None:  # transformers 5.24 renamed it; pass it only when there is one
            kwargs["past_key_values"] = past_key_values
        if cu_seqlens is not None:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("a packed batch (cu_seqlens) has no padding: pass no attention_mask")
            # transformers' names for the boundaries of a packed row, which its attention functions read.
            kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
            attention_mask = None
        llm_inputs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states, **kwargs)
        if loss_weight is not None and labels is not None:
            outputs = self._weighted_loss_forward(llm_inputs, labels, loss_weight)
        else:
            outputs = self.language_model(labels=labels, return_dict=True, **llm_inputs)
        return outputs if return_dict is not False else outputs.to_tuple()

    def _weighted_loss_forward(self, llm_inputs: dict, labels: torch.Tensor,
                               loss_weight: torch.Tensor) -> CausalLMOutputWithPast:
        """The LLM's decoder, then the weighted next-token loss on its last hidden state, chunked through the head
        (`internvl.lora.loss`) so the logits never exist in full; through the head's own forward when it trains."""
        if getattr(self.config.llm_config, "output_router_logits", False):
            raise ValueError("--loss_reduction sample / square: the MoE router's auxiliary loss is not weighed; "
                             "set output_router_logits False in the llm_config or use --loss_reduction token")
        num_items_in_batch = llm_inputs.pop("num_items_in_batch", None)
        llm_inputs.pop("use_cache", None)
        outputs = self.language_model.get_decoder()(**llm_inputs, use_cache=False, return_dict=True)
        hidden = outputs.last_hidden_state
        head = self.language_model.get_output_embeddings()
        if any(param.requires_grad for param in head.parameters()) or getattr(head, "bias", None) is not None:
            logits = head(hidden).float()
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            weights = F.pad(loss_weight.float(), (0, 1))[..., 1:]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="none",
                                 ignore_index=IGNORE_INDEX)
            divisor = num_items_in_batch if num_items_in_batch is not None else weights.sum().clamp(min=1e-12)
            loss = (ce * weights.reshape(-1)).sum() / divisor
        else:
            logits = None
            loss = linear_cross_entropy(hidden, head.weight, labels, num_items_in_batch, loss_weight)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        visual_features: torch.FloatTensor | None = None,
        generation_config: GenerationConfig | None = None,
        output_hidden_states: bool | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate from a prompt whose `<IMG_CONTEXT>` slots take the images' features; returns new tokens."""
        if visual_features is None and pixel_values is not None:
            visual_features = self.extract_feature(pixel_values)
        inputs_embeds = self._embed_with_images(input_ids, visual_features)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            output_hidden_states=output_hidden_states,
            use_cache=True,
            **generate_kwargs,
        )

    def chat(
        self,
        tokenizer,
        pixel_values: torch.FloatTensor | None,
        question: str,
        generation_config: dict,
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
        verbose: bool = False,
    ):
        """One chat turn as in the official model cards: `model.chat(tokenizer, pixel_values, question, cfg)`.

        `pixel_values` holds the tiles of every image of the question (`num_patches_list` gives tiles per
        image); `<image>` is prepended to a first question that lacks it. Returns the answer, and the updated
        history when `return_history`.
        """
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(
                f"num_patches_list sums to {sum(num_patches_list)} but pixel_values holds {pixel_values.shape[0]} tiles"
            )
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)

        template = get_conv_template(self.template)
        template.system_message = self.system_message
        stop_token = template.stop_token
        history = [] if history is None else list(history)
        for old_question, old_answer in history:
            template.append_message(template.roles[0], old_question)
            template.append_message(template.roles[1], old_answer)
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = template.get_prompt()
        if verbose and pixel_values is not None:
            print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
        for num_patches in num_patches_list:
            image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * self.num_image_token * num_patches + IMG_END_TOKEN
            query = query.replace("<image>", image_tokens, 1)

        model_inputs = tokenizer(query, return_tensors="pt")
        device = self.language_model.get_input_embeddings().weight.device
        generation_config = dict(generation_config)
        generation_config["eos_token_id"] = tokenizer.convert_tokens_to_ids(stop_token)
        generation_config.setdefault("pad_token_id", tokenizer.pad_token_id)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=self.vision_dtype)
        output_ids = self.generate(
            pixel_values=pixel_values,
            input_ids=model_inputs["input_ids"].to(device),
            attention_mask=model_inputs["attention_mask"].to(device),
            **generation_config,
        )
        response = decode_answers(tokenizer, output_ids, template)[0]
        history.append((question, response))
        if verbose:
            print(query.replace(IMG_CONTEXT_TOKEN * self.num_image_token, "<image>"), response)
        return (response, history) if return_history else response

    @property
    def vision_dtype(self) -> torch.dtype:
        """The dtype image tiles must have: the ViT's patch embedding's."""
        return next(self.vision_model.parameters()).dtype

    # ----- checkpoints ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: InternVLChatConfig | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
        **kwargs,
    ) -> "InternVLChatModel":
        """Load a checkpoint folder (safetensors, sharded or not) without running its code: the official format,
        or transformers' "-hf" format (converted on the way in; its `image_token_id` becomes `img_context_token_id`).

        `torch_dtype` (or `dtype`) casts the weights; "auto" keeps the checkpoint's. `device_map` may name one
        device ("cuda", "cpu", "auto" = the GPU when there is one). A config with `use_llm_lora` or
        `use_backbone_lora` set is wrapped before the weights are read, so official LoRA checkpoints load.
        """
        unknown = set(kwargs) - _IGNORED_LOAD_OPTIONS
        if model_args or unknown:
            raise TypeError(f"from_pretrained got unsupported arguments: {sorted(unknown) or model_args}")
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: no such checkpoint folder. Weights are never downloaded here: fetch the model on a "
                "machine with network (e.g. `huggingface-cli download OpenGVLab/InternVL2_5-8B --local-dir DIR`) "
                "and pass DIR"
            )
        checkpoint_format = checkpoint.folder_format(folder)
        raw = checkpoint.read_config(folder)
        config = config or InternVLChatConfig.from_dict(raw)
        config._name_or_path = str(folder)
        dtype = dtype or torch_dtype
        if dtype == "auto":
            dtype = checkpoint.checkpoint_dtype(raw)
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)

        with init_empty_weights(include_buffers=False):
            model = cls(config)
        state = checkpoint.load_state_dict(folder, dtype)
        if checkpoint_format == "hf":
            try:
                state = hf_format.original_state(state, raw["llm_config"])
            except hf_format.NotConvertible as error:
                raise ValueError(f"{folder}: {error}") from None
            model.img_context_token_id = checkpoint.read_json_config(folder)["image_token_id"]
        model.load_official_state_dict(state)
        model.checkpoint_format = checkpoint_format
        if device_map is not None:
            if device_map == "auto":
                device_map = "cuda" if torch.cuda.is_available() else "cpu"
            model.to(device_map)
        return model.eval()

    def load_official_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights with official key names into this model (meta or not); every parameter must be set."""
        if self.arch.per_expert_checkpoint:
            state = checkpoint.fuse_expert_weights(state, self.state_dict().keys())
        result = self.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:
            raise ValueError(
                f"the checkpoint has {len(result.unexpected_keys)} weights this model does not: "
                f"{result.unexpected_keys[:5]}... (does config.json describe these weights? a LoRA checkpoint "
                "needs use_llm_lora / use_backbone_lora set)"
            )
        if getattr(self.config.llm_config, "tie_word_embeddings", False):
            base = self.language_model
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            base.get_output_embeddings().weight = base.get_input_embeddings().weight
        missing = [name for name, p in self.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights of this model: {missing[:5]}...")

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the official checkpoint key names."""
        state = self.state_dict()
        if self.arch.per_expert_checkpoint:
            state = checkpoint.split_expert_weights(state)
        return state

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, state_dict: dict | None = None,
        max_shard_size: int | str = checkpoint.DEFAULT_SHARD_BYTES, checkpoint_format: str | None = None, **kwargs,
    ) -> None:
        """Write the folder format (config.json + safetensors) atomically into `save_directory`.

        `checkpoint_format` is "original" (official) or "hf" (transformers' `InternVLForConditionalGeneration`; needs
        `img_context_token_id`, its `image_token_id`); None: the format the model was loaded from. The folder must
        be new, empty, or an InternVL checkpoint: saved again, it is replaced, keeping its tokenizer and code files.
        Any other folder with files in it is refused rather than lost.
        """
        checkpoint_format = checkpoint_format or self.checkpoint_format
        if isinstance(max_shard_size, str):
            max_shard_size = convert_file_size_to_int(max_shard_size)
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        self.config.architectures = ["InternVLChatModel"]
        state = state_dict if state_dict is not None else self.official_state_dict()
        hf_config = None
        if checkpoint_format == "hf":
            if self.img_context_token_id is None:
                raise ValueError("saving the -hf format needs model.img_context_token_id (the tokenizer's "
                                 f"{IMG_CONTEXT_TOKEN} id, transformers' image_token_id)")
            hf_config = hf_format.hf_config(self.config.to_dict(), self.img_context_token_id)
            state = hf_format.hf_state(state, self.config.to_dict()["llm_config"])
        resaved = checkpoint.existing_config(save_directory) is not None
        with checkpoint.atomic_directory(save_directory, replace=resaved) as staging:
            if hf_config is None:
                self.config.save_pretrained(staging)
            else:
                (staging / checkpoint.CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
            checkpoint.save_state_dict(state, staging, max_shard_size)
            if resaved:
                checkpoint.copy_companion_files(save_directory, staging)
