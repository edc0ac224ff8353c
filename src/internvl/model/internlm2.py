"""InternLM2, the LLM of InternVL 1.5 / 2 / 2.5 (2B, 8B, 26B) and InternVL3-9B.

transformers has no InternLM2. It is LLaMA with other module names and one packed q/k/v projection. Module and
config field names here are the official ones, so official checkpoints' state dicts and `llm_config` load as they
are, and configs saved here load in the official code:

    this file (official)                    LLaMA in transformers
    model.tok_embeddings                    model.embed_tokens
    model.layers.{i}.attention.wqkv         self_attn.q_proj, k_proj, v_proj (packed, see InternLM2Attention)
    model.layers.{i}.attention.wo           self_attn.o_proj
    model.layers.{i}.feed_forward.w1/w3/w2  mlp.gate_proj / up_proj / down_proj
    model.layers.{i}.attention_norm         input_layernorm
    model.layers.{i}.ffn_norm               post_attention_layernorm
    model.norm, output                      model.norm, lm_head

Attention always runs through torch's scaled_dot_product_attention, and packed rows (samples told apart by
`cu_seq_lens_q`, or by positions restarting at 0) through `internvl.model.packed_attention`; the KV cache is
transformers' `Cache`, so `generate` works, from `input_ids` or from `inputs_embeds` (as the InternVL chat model
calls it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # InternLM2's RMSNorm, to the bit

from internvl.model.packed_attention import cu_seqlens_from_positions, varlen_attention

__all__ = [
    "InternLM2Config",
    "InternLM2ForCausalLM",
    "InternLM2Model",
    "InternLM2PreTrainedModel",
]

# Model outputs name the KV cache `past_key_values` in earlier transformers 5 releases (5.17) and `cache` in later
# ones (5.24); `generate` reads the field of its own version.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class InternLM2Config(PretrainedConfig):
    """Configuration of an InternLM2 model: the official field names and defaults (InternLM2-7B's shape).

    `rope_scaling` is None or `{"type": "linear" | "dynamic", "factor": f}` with f >= 1, as the official code
    accepts. `attn_implementation` is kept only so that configs round-trip to the official code, which reads it;
    the model here always runs torch's SDPA.
    """

    model_type = "internlm2"
    # transformers 5 defines `rope_scaling` on PretrainedConfig as a property that moves the value into
    # `rope_parameters`, a key the official code does not read; a plain class attribute shadows it.
    rope_scaling = None

    def __init__(
        self,
        vocab_size: int = 103168,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        bias: bool = True,
        rope_theta: float = 10000,
        rope_scaling: dict | None = None,
        attn_implementation: str = "eager",
        **kwargs,
    ):
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads}), "
                f"and num_attention_heads a multiple of num_key_value_heads ({num_key_value_heads})"
            )
        _check_rope_scaling(rope_scaling)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attn_implementation = attn_implementation
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def _check_rope_scaling(rope_scaling) -> None:
    """Raise a ValueError unless `rope_scaling` is None or {"type": "linear" | "dynamic", "factor": number >= 1}."""
    if rope_scaling is None:
        return
    expected = 'rope_scaling must be None or {"type": "linear" | "dynamic", "factor": a number >= 1}'
    if not isinstance(rope_scaling, dict) or set(rope_scaling) != {"type", "factor"}:
        raise ValueError(f"{expected}; got {rope_scaling!r}")
    if rope_scaling["type"] not in ("linear", "dynamic"):
        raise ValueError(f"{expected}; got type {rope_scaling['type']!r}")
    factor = rope_scaling["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"{expected}; got factor {factor!r}")


class InternLM2RotaryEmbedding(nn.Module):
    """cos and sin of the rotary embedding at given positions, in fp32: plain, linear or dynamic-NTK scaled.

    The inverse frequencies are recomputed per call (head_dim / 2 numbers) rather than kept in a buffer: dynamic
    NTK changes them with the sequence length anyway, and a non-persistent buffer would be left empty when the
    model is built on the meta device and its weights loaded afterwards.
    """

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.scaling_type = scaling.get("type")
        self.scaling_factor = scaling.get("factor", 1.0)

    def inverse_frequencies(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """(head_dim / 2,) rotation speeds; dynamic NTK raises the base once `seq_len` passes the trained length."""
        base = self.base
        if self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings:
            # The official InternLM2 formula, with seq_len the number of keys (cached ones included).
            factor, dim = self.scaling_factor, self.head_dim
            stretch = factor * seq_len / self.max_position_embeddings - (factor - 1)
            base = base * stretch ** (dim / (dim - 2))
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (base**exponents)

    def forward(self, position_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) -> cos, sin, each (batch, seq, head_dim) in fp32."""
        inv_freq = self.inverse_frequencies(seq_len, position_ids.device)
        positions = position_ids.to(torch.float32)
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        freqs = positions[..., None] * inv_freq  # (batch, seq, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, head_dim)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(query, key, cos, sin):
    """Rotate query (batch, heads, seq, head_dim) and key (batch, kv_heads, seq, head_dim) by cos/sin (batch, seq,
    head_dim), cast to the query's dtype first as the official code does."""
    cos = cos.unsqueeze(1).to(query.dtype)  # (batch, 1, seq, head_dim): shared by all heads
    sin = sin.unsqueeze(1).to(query.dtype)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


class RotaryApplication(nn.Module):
    """`apply_rotary_pos_emb` as a parameter-free module of the attention, so that a faster one can take its place
    per model (the fused training path's single-kernel rotary, `internvl.lora.fast`) instead of being swapped into
    this module's namespace for every model of the process."""

    def forward(self, query, key, cos, sin):
        return apply_rotary_pos_emb(query, key, cos, sin)


class InternLM2MLP(nn.Module):
    """Gated feed-forward: w2(act(w1 x) * w3 x), with w1 the gate, w3 the up and w2 the down projection."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states))


class InternLM2Attention(nn.Module):
    """Grouped-query self-attention with one packed projection `wqkv` and the output projection `wo`.

    `wqkv`'s output is laid out per key-value group: for each of the `num_key_value_heads` groups,
    `num_attention_heads / num_key_value_heads` query heads, then that group's key head, then its value head.
    Viewed as (batch, seq, num_key_value_heads, groups + 2, head_dim), the query heads of group g are g * groups
    ... g * groups + groups - 1, which is how SDPA's grouped-query attention pairs them with key head g.
    """

    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which layer's keys and values this is in the cache
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.wqkv = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=config.bias
        )
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)
        self.rotary = RotaryApplication()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (batch, seq, hidden) -> (batch, seq, hidden).

        attention_mask: None for plain causal attention, else boolean (batch, 1, seq, keys), True where a query
        may attend. past_key_values: the cache to read earlier keys and values from and append these to.
        cu_seqlens: the sample boundaries of a packed row (one row, no mask, no cache).
        """
        batch_size, seq_len, _ = hidden_states.shape
        groups = self.num_key_value_groups

        qkv = self.wqkv(hidden_states).view(batch_size, seq_len, self.num_key_value_heads, groups + 2, self.head_dim)
        query_states = qkv[..., :groups, :].reshape(batch_size, seq_len, self.num_heads, self.head_dim)
        query_states = query_states.transpose(1, 2)  # (batch, heads, seq, head_dim)
        key_states = qkv[..., -2, :].transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
        # A copy: attention saves its value input for backward, and a view would keep all of qkv alive with it.
        value_states = qkv[..., -1, :].contiguous().transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = self.rotary(query_states, key_states, cos, sin)
        if past_key_values is not None:
            # (batch, kv_heads, keys, head_dim): the cached keys and values followed by these
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        if cu_seqlens is not None:
            attn_output = varlen_attention(self, query_states, key_states, value_states, cu_seqlens,
                                           sdpa_attention_forward).transpose(1, 2)
        elif attention_mask is None:
            # Without a mask SDPA can pick its flash kernel, which shares each key head among its query heads.
            attn_output = F.scaled_dot_product_attention(
                query_states, key_states, value_states, is_causal=seq_len > 1, enable_gqa=groups > 1
            )
        else:
            # With a mask, CUDA's kernels fall back to plain math for grouped heads; repeat the key heads instead.
            key_states = key_states.repeat_interleave(groups, dim=1)  # (batch, heads, keys, head_dim)
            value_states = value_states.repeat_interleave(groups, dim=1)
            attn_output = F.scaled_dot_product_attention(
                query_states, key_states, value_states, attn_mask=attention_mask
            )
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, seq_len, self.num_heads * self.head_dim)
        return self.wo(attn_output)


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    """One pre-norm transformer block: x + attention(attention_norm(x)), then the same with the feed-forward."""

    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (batch, seq, hidden) -> (batch, seq, hidden); arguments as InternLM2Attention's."""
        residual = hidden_states
        hidden_states = self.attention(
            self.attention_norm(hidden_states), position_embeddings, attention_mask, past_key_values, cu_seqlens
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.feed_forward(self.ffn_norm(hidden_states))
        return residual + hidden_states


def attention_mask_for_sdpa(
    attention_mask: torch.Tensor | None, past_length: int, seq_len: int, device: torch.device,
) -> torch.Tensor | None:
    """A boolean (batch, 1, seq, keys) mask for SDPA from a 2-D (batch, keys) padding mask, or None when SDPA's own
    causal flag is enough (no padding, and no cached keys or a single query). keys = past_length + seq_len."""
    num_keys = past_length + seq_len
    if attention_mask is not None and attention_mask.shape[-1] != num_keys:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens; expected {num_keys} "
            f"({past_length} cached + {seq_len} new)"
        )
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and (past_length == 0 or seq_len == 1):
        return None
    query_index = torch.arange(past_length, num_keys, device=device)[:, None]  # (seq, 1): place among the keys
    key_index = torch.arange(num_keys, device=device)[None, :]  # (1, keys)
    allowed = (key_index <= query_index)[None, None]  # (1, 1, seq, keys)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (batch, 1, seq, keys)
    # A left-padding query may see no key at all; SDPA (torch >= 2.5) gives such a row zeros, not NaN.
    return allowed


class InternLM2PreTrainedModel(PreTrainedModel):
    """The class facts transformers needs (checkpointing, device maps, SDPA); transformers' default weight
    initialisation is InternLM2's own (normal linears and embeddings, zero padding row, unit norms)."""

    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _supports_sdpa = True


class InternLM2Model(InternLM2PreTrainedModel):
    """The InternLM2 decoder: token embeddings, `num_hidden_layers` decoder layers and a final RMSNorm."""

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [InternLM2DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = InternLM2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding, `tok_embeddings`."""
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.tok_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder on `input_ids` or `inputs_embeds` (batch, seq[, hidden]) -> last hidden state.

        attention_mask: (batch, cached + seq) with 1 for tokens and 0 for padding, left or right. position_ids:
        (batch, seq), by default counting on from the cache's length; pass them for left-padded rows or packed
        samples. past_key_values: a transformers `Cache` (newer transformers pass it as `cache`); with
        `use_cache` a new DynamicCache is made when none is given, and returned.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise ValueError("output_attentions is not supported: attention runs in SDPA, which returns no weights")
        if past_key_values is None:
            past_key_values = kwargs.get("cache")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            # Recomputing a layer in backward would append its keys to the cache a second time.
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        hidden_states = inputs_embeds  # (batch, seq, hidden)
        seq_len = hidden_states.shape[1]
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None and position_ids is not None and past_length == 0 and attention_mask is None:
            # Only a caller's positions can mark packed samples (the default never restarts at 0).
            cu_seqlens = cu_seqlens_from_positions(position_ids)
        mask = None if cu_seqlens is not None else attention_mask_for_sdpa(
            attention_mask, past_length, seq_len, hidden_states.device)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_len, device=hidden_states.device)[None]
        position_embeddings = self.rotary_emb(position_ids, seq_len=past_length + seq_len)

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            # hidden_states goes positionally: reentrant gradient checkpointing passes gradients only through those.
            hidden_states = layer(
                hidden_states, position_embeddings, attention_mask=mask, past_key_values=past_key_values,
                cu_seqlens=cu_seqlens,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{_CACHE_FIELD: past_key_values if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """InternLM2 with its language-model head `output`: logits, the training loss, and `generate`."""

    _tied_weights_keys = {"output.weight": "model.tok_embeddings.weight"}  # used only when tie_word_embeddings

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding, `model.tok_embeddings`."""
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        """The language-model head, `output`."""
        return self.output

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the language-model head."""
        self.output = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (batch, seq, vocab) for `input_ids` or `inputs_embeds`, and the loss when `labels` are given.

        Arguments as `InternLM2Model.forward`, plus: labels (batch, seq), -100 where no loss is wanted;
        logits_to_keep: when > 0, logits only for the last that many positions (`generate` asks for 1);
        cache_position: accepted from callers of older transformers APIs and not needed, since the cache knows
        its own length. The loss is transformers' causal-LM loss (`self.loss_function`), which takes the Trainer's
        `num_items_in_batch` from kwargs so that gradient accumulation weighs every token alike.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (batch, seq, hidden)
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        logits = self.output(hidden_states)  # (batch, seq, vocab)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()
