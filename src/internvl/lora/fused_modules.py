"""The fused training path's modules: each takes the place of one module of a PEFT-wrapped LLM, and computes what
that module computes through `internvl.lora.functions`.

Each holds the children and parameters of the module it replaces under the same names, so the optimizer,
`state_dict` and PEFT's `save_pretrained` see the same tensors under the same keys while it is in place. The
replaced module itself is kept outside the module tree (a plain attribute: as a child, its keys would move under
a new prefix), except PEFT's LoRA linear, whose fused form is a PEFT LoRA layer made from its state, since PEFT
finds its layers by type. `internvl.lora.fast.enable_fast_lora` chooses what goes where from the arch table and
puts the originals back on `restore()`.

- `FusedLoraLinear`: PEFT's LoRA linear as one `LinearLora` node.
- `FusedGatedMLP`: an MLP `down(silu(gate(x)) * up(x))` whose three projections are LoRA linears, as a
  `GatedLoraA` and a `LinearLoraB` node; `recompute_gate_up` (set by `internvl.train.checkpointing`) makes it
  save neither the gate nor the up output and recompute both in backward.
- `FusedRMSNorm`: an RMSNorm of the architecture's formula as one `RMSNormFunction` node.
- `FoldedRMSNorm`: an RMSNorm whose every reader is a fused module given its `Norm`: it passes its input
  through, and each reader applies the norm inside its own node (saving the norm's input, which the decoder
  layer keeps as its residual anyway, rather than a [tokens, hidden] output of its own).
- `FusedRotary`: InternLM2's rotary application (`InternLM2Attention.rotary`) as `RotaryFunction`.
- `FusedCausalLMForward`: the causal LM's forward with `labels`, the loss computed from the last hidden state by
  `internvl.lora.loss` so the logits never exist (the output has `logits=None`); without labels, the model's own.
  It is the one piece set as an instance's `forward` rather than put in a module's place: transformers' causal-LM
  forwards compute the full logits before any seam where a module could take over.

PEFT's switches (`disable_adapter()`, `merge_adapter()`, ...) reach every LoRA layer while the fused modules are in
place; a layer's flags (disabled, merged) are read on every call, and PEFT's own forward runs while they are set.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from internvl.lora.functions import (
    GatedLoraA,
    LinearLora,
    LinearLoraB,
    Norm,
    Projection,
    RMSNormFunction,
    apply_rotary_pos_emb,
)
from internvl.lora.loss import linear_cross_entropy


def runs_peft(lora: LoraLinear) -> bool:
    """True while PEFT's own path must run: adapters disabled or merged (both can change after the swap)."""
    return lora.disable_adapters or lora.merged


def lora_parts(lora: LoraLinear) -> tuple[Projection, torch.Tensor, torch.Tensor]:
    """(Projection, A, B) of a LoRA linear's active adapter, for the current training mode."""
    name = lora.active_adapters[0]
    dropout = lora.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    base = lora.get_base_layer()
    proj = Projection(base.weight, base.bias, float(lora.scaling[name]), float(p))
    return proj, lora.lora_A[name].weight, lora.lora_B[name].weight


def adapter_parameters(lora: LoraLinear) -> list[nn.Parameter]:
    """The parameters a fused node computes gradients for: the active adapter's A and B."""
    name = lora.active_adapters[0]
    return [lora.lora_A[name].weight, lora.lora_B[name].weight]


def _seed() -> int:
    # From the CPU generator, which gradient checkpointing restores: a recomputed layer redraws the same masks.
    return int(torch.randint(2**31 - 1, ()).item())  # Triton's Philox takes a 32-bit seed


def _norm_output(x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
    return x if norm is None else RMSNormFunction.apply(x, norm)


class _Replacement(nn.Module):
    """A module in another's place: that module's children and parameters under their own names, and the module
    itself as `original`, outside the module tree."""

    def __init__(self, original: nn.Module):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in original.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
        object.__setattr__(self, "original", original)  # not a child: its keys would move under `original.`
        self.training = original.training


class FusedLoraLinear(LoraLinear):
    """PEFT's LoRA linear (`peft.tuners.lora.Linear` over an `nn.Linear`), computing its forward as one
    `LinearLora` node.

    It is a PEFT LoRA layer itself, made from the original's state (the same children, parameters and adapter
    settings), because PEFT finds its layers by type: `save_pretrained` picks the adapter's weights from the LoRA
    layers it visits, and `disable_adapter()`, `merge_adapter()` and `set_adapter()` act on them. While any of those
    is in effect, PEFT's own forward runs. `hand_back` gives the state, as PEFT left it, back to the original.
    With a `norm`, its input is that RMSNorm's input (see `FoldedRMSNorm`).
    """

    @classmethod
    def of(cls, lora: LoraLinear, norm: Norm | None = None) -> FusedLoraLinear:
        fused = cls.__new__(cls)  # not __init__: that would make a new adapter
        fused.__dict__.update(vars(lora))  # its own attribute dict, holding the same children and parameters
        fused.norm = norm
        return fused

    def hand_back(self, lora: LoraLinear) -> None:
        """Copy the adapter state PEFT may have changed while this layer was in place (enabled, active adapter,
        training mode) back to `lora`, whose children and parameters it shares."""
        lora.__dict__.update((key, value) for key, value in vars(self).items() if key != "norm")

    def forward(self, x, *args, **kwargs):
        if args or kwargs or runs_peft(self):
            return super().forward(_norm_output(x, self.norm), *args, **kwargs)
        proj, lora_a, lora_b = lora_parts(self)
        return LinearLora.apply(x, proj, _seed(), self.norm, lora_a, lora_b)


class FusedGatedMLP(_Replacement):
    """An MLP computing `down(silu(gate(x)) * up(x))` over three LoRA linears (`names`: gate, up, down), as a
    `GatedLoraA` node and a `LinearLoraB` node.

    `recompute_gate_up`: save neither the gate nor the up output, recompute both in backward (two GEMMs). With a
    `norm`, its input is that RMSNorm's input (see `FoldedRMSNorm`).
    """

    def __init__(self, mlp: nn.Module, names: tuple[str, str, str], norm: Norm | None = None):
        super().__init__(mlp)
        self.names, self.norm = names, norm
        self.recompute_gate_up = False

    def forward(self, x):
        layers = [getattr(self, name) for name in self.names]
        if any(runs_peft(layer) for layer in layers):
            return self.original(_norm_output(x, self.norm))
        (gate_proj, gate_a, gate_b), (up_proj, up_a, up_b), (down_proj, down_a, down_b) = map(lora_parts, layers)
        act, h = GatedLoraA.apply(x, (gate_proj, up_proj, down_proj), (_seed(), _seed(), _seed()),
                                  self.recompute_gate_up, self.norm, gate_a, gate_b, up_a, up_b, down_a)
        return LinearLoraB.apply(act, h, down_proj, down_b)


class FusedRMSNorm(_Replacement):
    """An RMSNorm (a frozen `weight`, `variance_epsilon`) of the formula `formula` as one `RMSNormFunction` node."""

    def __init__(self, norm: nn.Module, formula: str):
        super().__init__(norm)
        self.spec = Norm(norm.weight, norm.variance_epsilon, formula)

    def forward(self, x):
        return RMSNormFunction.apply(x, self.spec)


class FoldedRMSNorm(FusedRMSNorm):
    """An RMSNorm whose output only fused modules read, each given `spec` and applying it to its own input: this
    module passes its input through. `enable_fast_lora` folds a norm only when the arch table's `norm_readers`
    are all such modules."""

    def forward(self, x):
        return x


class FusedRotary(_Replacement):
    """InternLM2's rotary application `(q, k, cos, sin) -> (q', k')` (rotate-half, cos and sin cast to q's dtype)
    as one `RotaryFunction` kernel each way."""

    def forward(self, query, key, cos, sin):
        return apply_rotary_pos_emb(query, key, cos, sin)


class FusedCausalLMForward:
    """`llm.forward` with labels: the decoder, then `linear_cross_entropy` on its last hidden state (frozen
    bias-free linear head `head`); without labels, or asked for an MoE router's logits (whose auxiliary loss the
    class adds), `original`: the class's forward."""

    def __init__(self, llm: nn.Module, head: nn.Linear):
        self.llm, self.head = llm, head
        self.original = type(llm).forward.__get__(llm)

    def __call__(self, *args, labels=None, **kwargs):
        if labels is None or kwargs.get("output_router_logits"):  # MoE's auxiliary loss: the model's own forward
            return self.original(*args, labels=labels, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        outputs = self.llm.get_decoder()(*args, **kwargs)
        loss = linear_cross_entropy(outputs.last_hidden_state, self.head.weight, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                      attentions=getattr(outputs, "attentions", None))
