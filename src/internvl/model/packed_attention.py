"""Causal attention over packed rows: several samples in one row, each attending only to its own earlier tokens.

A packed row is told apart into samples by `cu_seqlens` (int32 [samples + 1], the boundaries, as
`Collator(pack=True)` makes them and transformers' padding-free kwargs `cu_seq_lens_q` / `cu_seq_lens_k` name
them). No [T, T] mask is ever made: on CUDA one FlexAttention call with a document mask (a block-sparse kernel
that skips the blocks between samples) runs the whole row; elsewhere, and for attention FlexAttention cannot
express (GPT-OSS's sinks), the architecture's own attention runs once per sample.

transformers' LLMs take this attention through their attention interface: `packed_implementation("sdpa")` is
"packed_sdpa", registered here as sdpa with the packed path added (and "packed_eager" likewise). Without
`cu_seq_lens_q` they run the base implementation as it is, with the base's own mask; with it, the mask function
makes no mask at all (the packed path needs none).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

PACKED_PREFIX = "packed_"
BASE_MASKS = {"sdpa": sdpa_mask, "eager": eager_mask}


def packed_implementation(base: str) -> str:
    """The attention implementation name that runs `base` on unpacked batches and varlen attention on packed ones."""
    return PACKED_PREFIX + base if base in BASE_MASKS else base


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The sample boundaries of one packed row from its positions restarting at 0, or None when they never do."""
    if position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().squeeze(1)
    if starts.numel() <= 1 and (starts.numel() == 0 or int(starts[0]) == 0):
        return None
    length = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    return torch.cat([starts, length]).to(torch.int32)


def sample_spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each non-empty sample of a packed row."""
    bounds = cu_seqlens.tolist()
    return [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]


def causal_mask(length: int, sliding_window: int | None, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[1, 1, length, length]: True (or 0.0 in `dtype`) where a query may attend; -inf-like elsewhere."""
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    allowed = key <= query
    if sliding_window:
        allowed = allowed & (query - key < sliding_window)
    if dtype is None:
        return allowed[None, None]
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[None, None]


_flex = None


def _compiled_flex():
    """FlexAttention compiled once per process (uncompiled, it materialises the full score matrix)."""
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex = torch.compile(flex_attention, dynamic=True)
    return _flex


_block_masks: dict = {}


def _document_block_mask(cu_seqlens: torch.Tensor, length: int, sliding_window: int | None):
    """The FlexAttention block mask of a packed row; made once per row and reused by every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (cu_seqlens.data_ptr(), cu_seqlens._version, tuple(cu_seqlens.shape), length, sliding_window)
    if key not in _block_masks:
        positions = torch.arange(length, device=cu_seqlens.device)
        document = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)

        def same_sample_causal(batch, head, query, key_index):
            allowed = (document[query] == document[key_index]) & (key_index <= query)
            if sliding_window:
                allowed = allowed & (query - key_index < sliding_window)
            return allowed

        _block_masks.clear()  # one row at a time: the previous row's mask is done with
        _block_masks[key] = create_block_mask(same_sample_causal, None, None, length, length,
                                              device=cu_seqlens.device)
    return _block_masks[key]


def flex_usable(query: torch.Tensor, module: torch.nn.Module) -> bool:
    """FlexAttention runs this: CUDA, no attention sinks, and a head size its kernels take."""
    head_dim = query.shape[-1]
    return (query.is_cuda and getattr(module, "sinks", None) is None and head_dim >= 16
            and head_dim & (head_dim - 1) == 0)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    per_sample: Callable,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Causal attention of a packed row, each sample on its own: query [1, heads, T, d], key / value
    [1, kv_heads, T, d] -> [1, T, heads, d].

    `per_sample(module, q, k, v, mask, scaling=, **kwargs)` is the architecture's own attention, run once per
    sample with that sample's causal mask when FlexAttention cannot run the row.
    """
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row; got {query.shape[0]} rows with cu_seqlens")
    length = query.shape[2]
    if flex_usable(query, module) and not kwargs.get("dropout"):
        block_mask = _document_block_mask(cu_seqlens, length, sliding_window)
        out = _compiled_flex()(query, key, value, block_mask=block_mask, scale=scaling,
                               enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2)
    outputs = []
    for start, end in sample_spans(cu_seqlens):
        span = end - start
        mask = None
        if per_sample is not sdpa_attention_forward or (sliding_window and span > sliding_window):
            mask = causal_mask(span, sliding_window, query.device, query.dtype)
        out, _ = per_sample(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], mask,
                            scaling=scaling, sliding_window=sliding_window, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1)


def _base_attention(base: str, module: torch.nn.Module) -> Callable:
    """The function transformers would run for `base` on this module (a model file's own eager one if it has it)."""
    if base == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return AttentionInterface._global_mapping[base]


def _packed_forward(base: str) -> Callable:
    # cu_seq_lens_k and the max lengths are named only to keep them from the base functions: a packed row's keys
    # are its queries.
    def attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
                  max_length_q=None, max_length_k=None, **kwargs):
        run = _base_attention(base, module)
        fresh = attention_mask is None and query.shape[2] == key.shape[2] > 1  # no padding, no cache
        if not fresh:
            return run(module, query, key, value, attention_mask, **kwargs)
        if cu_seq_lens_q is None and kwargs.get("position_ids") is not None:
            cu_seq_lens_q = cu_seqlens_from_positions(kwargs["position_ids"])  # packed by positions alone
        if cu_seq_lens_q is not None:
            return varlen_attention(module, query, key, value, cu_seq_lens_q, run, **kwargs), None
        # The mask function made no mask (see _packed_mask): causality, and any window, are applied here.
        window = kwargs.get("sliding_window")
        mask = None
        if run is not sdpa_attention_forward or (window and query.shape[2] > window):
            mask = causal_mask(query.shape[2], window, query.device, query.dtype)
        return run(module, query, key, value, mask, **kwargs)

    attention.__doc__ = f"transformers' {base} attention, and causal attention per sample on packed rows."
    return attention


def _packed_mask(base: str) -> Callable:
    base_mask = BASE_MASKS[base]

    def mask(*, attention_mask=None, **kwargs):
        q_length = kwargs["q_length"] if "q_length" in kwargs else kwargs["cache_position"].shape[0]
        if attention_mask is None and kwargs.get("kv_offset", 0) == 0 and q_length == kwargs["kv_length"]:
            # No padding and no cache: the attention applies causality itself, per sample when packed, so a
            # packed row never gets the [T, T] mask transformers would build from its positions.
            return None
        return base_mask(attention_mask=attention_mask, **kwargs)

    return mask


for _base in BASE_MASKS:
    AttentionInterface.register(packed_implementation(_base), _packed_forward(_base))
    AttentionMaskInterface.register(packed_implementation(_base), _packed_mask(_base))
