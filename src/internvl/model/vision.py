"""InternViT, the vision encoder of InternVL: a pre-norm ViT with layer scale and a class token.

Module and parameter names are the official ones, so the `vision_model.*` weights of an official InternVL
checkpoint load as they are, and `InternVisionConfig` reads and writes the official `vision_config`. Two styles
exist: InternViT-300M (LayerNorm, qkv bias, no qk-norm) and InternViT-6B (RMSNorm, qk-norm, no qkv bias).
Attention runs on torch's `scaled_dot_product_attention`; `use_flash_attn` is accepted and ignored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class InternVisionConfig(PretrainedConfig):
    """Configuration of an InternViT: the official `vision_config`, field names and defaults (InternViT-6B's).

    `norm_type` is "rms_norm" or "layer_norm"; `qk_normalization` adds an RMSNorm on queries and keys;
    `initializer_factor` is the initial value of the layer-scale vectors; `drop_path_rate` is the stochastic
    depth of the last layer (earlier layers get less, linearly from 0).
    """

    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 14,
        image_size: int = 224,
        qkv_bias: bool = False,
        hidden_size: int = 3200,
        num_attention_heads: int = 25,
        intermediate_size: int = 12800,
        qk_normalization: bool = True,
        num_hidden_layers: int = 48,
        use_flash_attn: bool = True,
        hidden_act: str = "gelu",
        norm_type: str = "rms_norm",
        layer_norm_eps: float = 1e-6,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"norm_type must be 'rms_norm' or 'layer_norm', got {norm_type!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_attention_heads} heads")
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor


# InternViT-6B's RMSNorm normalises in fp32 and casts back before the weight, as LlamaRMSNorm does.
_NORMS = {"rms_norm": LlamaRMSNorm, "layer_norm": nn.LayerNorm}


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a random subset of the samples.

    The kept samples are scaled by 1 / (1 - rate) so the expected output is unchanged; in eval it is the identity.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)  # [B, 1, 1]
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def interpolate_pos_embed(patch_pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize patch position embeddings [1, n*n, C] of a square grid bicubically to `grid` = (rows, cols).

    Works in fp32 and returns the input's dtype, as the official `_get_pos_embed`; at the same grid it returns
    the input unchanged.
    """
    side = math.isqrt(patch_pos_embed.shape[1])
    pos = patch_pos_embed.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C, n, n]
    pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)  # [1, C, rows, cols]
    return pos.flatten(2).transpose(1, 2).to(patch_pos_embed.dtype)  # [1, rows*cols, C]


class InternVisionEmbeddings(nn.Module):
    """Patch embedding (a strided conv), a class token in front, and learned position embeddings.

    Images of another size than `config.image_size` work: the position embeddings follow the patch grid.
    """

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        num_patches = (config.image_size // patch) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embedding = nn.Conv2d(config.num_channels, width, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + num_patches, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [B, C, rows, cols]
        batch, _, rows, cols = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [B, rows*cols, C]
        class_token = self.class_embedding.to(dtype).expand(batch, -1, -1)  # [B, 1, C]
        embeddings = torch.cat([class_token, patches], dim=1)  # [B, 1 + rows*cols, C]
        position = torch.cat(
            [self.position_embedding[:, :1], interpolate_pos_embed(self.position_embedding[:, 1:], (rows, cols))],
            dim=1,
        )  # [1, 1 + rows*cols, C]
        return embeddings + position.to(dtype)


class InternVisionAttention(nn.Module):
    """Multi-head self-attention over all tokens (no mask) with one packed `qkv` projection."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if config.qk_normalization:
            # Over the full width, all heads together, as the official weights were trained.
            self.q_norm = LlamaRMSNorm(width, eps=config.layer_norm_eps)
            self.k_norm = LlamaRMSNorm(width, eps=config.layer_norm_eps)
        self.attention_dropout = config.attention_dropout
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x [B, N, C], each head's D channels one after another
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, h, N, D]
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # [B, h, N, D]
        out = out.transpose(1, 2).reshape(batch, seq, width)  # [B, N, C]
        return self.proj_drop(self.proj(out))


class InternVisionMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block; each branch is scaled by a learned vector (`ls1`, `ls2`) and may be dropped
    per sample in training (`drop_path_rate`)."""

    def __init__(self, config: InternVisionConfig, drop_path_rate: float = 0.0):
        super().__init__()
        norm = _NORMS[config.norm_type]
        self.attn = InternVisionAttention(config)
        self.mlp = InternVisionMLP(config)
        self.norm1 = norm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = norm(config.hidden_size, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.drop_path1 = DropPath(drop_path_rate)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path1(self.ls1 * self.attn(self.norm1(hidden_states)))
        hidden_states = hidden_states + self.drop_path2(self.ls2 * self.mlp(self.norm2(hidden_states)))
        return hidden_states


class InternVisionEncoder(nn.Module):
    """The stack of encoder layers, with drop-path rates rising linearly from 0 to `config.drop_path_rate`."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        layers = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(layers - 1, 1) for i in range(layers)]
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, rate) for rate in rates)

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run every layer; return the last output and, if asked, the input followed by every layer's output."""
        all_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)  # positional: reentrant checkpointing only sees positional inputs
            if output_hidden_states:
                all_states += (hidden_states,)
        return hidden_states, all_states


class InternVisionModel(PreTrainedModel):
    """InternViT: images [B, 3, H, W] -> tokens [B, 1 + (H/patch)*(W/patch), C], class token first.

    Gradient checkpointing is per encoder layer (`gradient_checkpointing_enable()`); transformers 5 defaults it
    to non-reentrant, under which a LoRA inside a frozen ViT still gets gradients. Keep `use_reentrant=False`.
    """

    config_class = InternVisionConfig
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' default covers the linears, the convolution and the norms; these parameters are InternViT's.
        super()._init_weights(module)
        if isinstance(module, InternVisionEmbeddings):
            init.normal_(module.class_embedding, std=self.config.initializer_range)
            init.normal_(module.position_embedding, std=self.config.initializer_range)
        elif isinstance(module, InternVisionEncoderLayer):
            init.constant_(module.ls1, self.config.initializer_factor)
            init.constant_(module.ls2, self.config.initializer_factor)

    def get_input_embeddings(self) -> InternVisionEmbeddings:
        """The embeddings module (what `enable_input_require_grads` hooks), as in the official model."""
        return self.embeddings

    def resize_pos_embeddings(self, old_size: int, new_size: int, patch_size: int) -> None:
        """Resize `position_embedding` for good from `old_size`- to `new_size`-pixel images (the official
        `force_image_size` step), bicubically; the class token's embedding is kept. Also sets `config.image_size`,
        so the model saves and reloads at the new size."""
        old = self.embeddings.position_embedding
        if old.shape[1] != 1 + (old_size // patch_size) ** 2:
            raise ValueError(
                f"position_embedding has {old.shape[1]} positions, not 1 + ({old_size} // {patch_size})^2"
            )
        grid = new_size // patch_size
        with torch.no_grad():
            patch_pos = interpolate_pos_embed(old[:, 1:], (grid, grid))  # [1, grid*grid, C]
            resized = torch.cat([old[:, :1], patch_pos], dim=1)  # [1, 1 + grid*grid, C]
        self.embeddings.position_embedding = nn.Parameter(resized, requires_grad=old.requires_grad)
        self.config.image_size = new_size

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode images [B, 3, H, W] (any multiple of the patch size).

        Returns `last_hidden_state` [B, 1 + N, C], `pooler_output` (the class token, [B, C]) and, with
        `output_hidden_states`, `hidden_states`: the embeddings, then each layer's output (num_hidden_layers + 1).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        embeddings = self.embeddings(pixel_values)  # [B, 1 + N, C]
        last_hidden_state, hidden_states = self.encoder(embeddings, output_hidden_states)
        pooled = last_hidden_state[:, 0]  # [B, C]
        if not return_dict:
            return (last_hidden_state, pooled) + ((hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=hidden_states
        )
