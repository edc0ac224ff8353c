"""The fused training path's autograd functions: a LoRA linear, a gated MLP's LoRA linears, RMSNorm, rotary.

PEFT's LoRA layer runs the adapter beside the base layer as separate operations: the input is cast to the
adapter's float32, dropped out, sent through `lora_A` and `lora_B`, scaled, and added to the base output, each
step a full pass over a [tokens, features] tensor with its own saved activations. Here:

- each LoRA linear is one node (`LinearLora`): the base output with the adapter's low-rank update added in
  place, one input gradient for base and adapter together, no gradient for the frozen weight, and only the input
  and the rank-r intermediate saved (the dropout mask is redrawn from a seed in backward, `internvl.lora.products`);
- a gated MLP (`down(silu(gate(x)) * up(x))`) runs gate, up, SwiGLU and the down projection's LoRA-A product as
  one node (`GatedLoraA`) that recomputes `silu(g) * u` in backward, so the [tokens, intermediate] product is
  never stored, and can recompute g and u themselves; the down projection's base GEMM and LoRA-B product are a
  node of their own (`LinearLoraB`) that saves nothing, so a checkpointed layer's recompute stops before it;
- a node given a `Norm` takes that RMSNorm's input rather than its output and applies the norm inside: it saves
  the norm's input (which the layer keeps anyway as its residual) instead of a [tokens, hidden] output of its own,
  and recomputes the output in backward (`internvl.lora.fused_modules.FoldedRMSNorm` says when);
- a standalone RMSNorm saves its input and the per-row scale only; rotary embedding is one kernel each way,
  saving nothing but cos and sin.

Precision: the adapter runs in the input's dtype (PEFT upcasts to float32); in bfloat16 that is within bfloat16's
own noise. In float16, whose range (65504) the GradScaler's scaled gradients summed over tokens can exceed, the
adapter's gradients are computed in float32, as PEFT computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from internvl.lora.elementwise import RMS_NORMS, compiled, rotary, rotary_backward, swiglu, swiglu_backward
from internvl.lora.products import add_lora_input_grad_, lora_a_grad, lora_a_product


@dataclass(frozen=True)
class Projection:
    """A frozen linear layer and its LoRA adapter's constants, as the fused functions see them."""

    weight: torch.Tensor  # [out, in]; frozen
    bias: torch.Tensor | None  # frozen
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    dropout: float  # the adapter-input dropout rate, 0.0 when not training


@dataclass(frozen=True)
class Norm:
    """A frozen RMSNorm that a node applies to its own input (see the module docstring)."""

    weight: torch.Tensor
    eps: float
    formula: str  # a key of internvl.lora.elementwise.RMS_NORMS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the norm's output, 1/rms per row); bitwise the same in forward and in backward's recompute."""
        return compiled(RMS_NORMS[self.formula][0], x)(x, self.weight, self.eps)

    def backward(self, dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        return compiled(RMS_NORMS[self.formula][1], x)(dy, x, self.weight, rstd)


def _grad_dtype(dy: torch.Tensor) -> torch.dtype:
    """The dtype of the adapter's gradient products: float32 for float16 (see the module docstring)."""
    return torch.float32 if dy.dtype == torch.float16 else dy.dtype


def _lora_forward(x2, proj: Projection, seed, lora_a, lora_b):
    """Base output with the adapter's update added in place, and the rank-r intermediate h backward needs."""
    h = lora_a_product(x2, lora_a, proj.dropout, seed)  # [N, r]
    if proj.dropout:
        h.mul_(1.0 / (1.0 - proj.dropout))  # inverted dropout's scale, on the small tensor
    return _base_plus_lora_b(x2, proj, h, lora_b), h  # [N, out]


def _base_plus_lora_b(x2, proj: Projection, h, lora_b):
    """x2 W^T + b + scale * h B^T: the frozen base output with the adapter's low-rank update added in place."""
    return F.linear(x2, proj.weight, proj.bias).addmm_(h, lora_b.to(x2.dtype).t(), alpha=proj.scale)


def _lora_b_backward(dy2, h, proj: Projection, lora_b, dh_scale: float):
    """(dB, dh) of `scale * h B^T`: [out, r] and [N, r] (dh times `dh_scale`), in `_grad_dtype`."""
    dtype = _grad_dtype(dy2)
    dy_g = dy2.to(dtype)
    grad_b = (dy_g.t() @ h.to(dtype)).mul_(proj.scale)
    dh = (dy_g @ lora_b.to(dtype)).mul_(proj.scale * dh_scale)
    return grad_b, dh


def _lora_backward(x2, dy2, h, proj: Projection, seed, lora_a, lora_b, dx2, need_dx: bool):
    """Gradients of `_lora_forward`: the adapter's (dA, dB), and dx accumulated into `dx2` (None: a new one)."""
    grad_b, dh = _lora_b_backward(dy2, h, proj, lora_b, 1.0 / (1.0 - proj.dropout))
    grad_a = lora_a_grad(dh, x2, proj.dropout, seed)  # [r, in]
    if need_dx:
        dx2 = dy2 @ proj.weight if dx2 is None else dx2.addmm_(dy2, proj.weight)  # the frozen base's share
        add_lora_input_grad_(dh, lora_a, proj.dropout, seed, dx2)
    return dx2, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)


def _node_input(x: torch.Tensor, norm: Norm | None):
    """(what the node computes on, as [N, features]; 1/rms, or None without a norm). The norm runs on x in its
    own shape, the shape a standalone norm sees (one compiled graph for both)."""
    if norm is None:
        return x.reshape(-1, x.shape[-1]), None
    n, rstd = norm.forward(x)
    return n.reshape(-1, n.shape[-1]), rstd


def _input_grad(dn2, x: torch.Tensor, norm: Norm | None, rstd):
    """The node's input gradient in x's shape, from that of what it computed on: through the norm if it has one."""
    if dn2 is None:
        return None
    return dn2.view(x.shape) if norm is None else norm.backward(dn2.view(x.shape), x, rstd)


class LinearLora(torch.autograd.Function):
    """`y = n W^T + b + scale * drop(n) A^T B^T` for a frozen linear layer and its LoRA adapter, n = x or norm(x).

    Arguments: x, the `Projection`, the dropout seed, the `Norm` or None, A, B (only x and the adapter get
    gradients). Saves x and the rank-r intermediate.
    """

    @staticmethod
    def forward(ctx, x, proj, seed, norm, lora_a, lora_b):
        n2, _ = _node_input(x, norm)
        y, h = _lora_forward(n2, proj, seed, lora_a, lora_b)
        ctx.save_for_backward(x, h, lora_a, lora_b)
        ctx.proj, ctx.seed, ctx.norm = proj, seed, norm
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, h, lora_a, lora_b = ctx.saved_tensors
        n2, rstd = _node_input(x, ctx.norm)
        dn2, grad_a, grad_b = _lora_backward(n2, dy.reshape(-1, dy.shape[-1]), h, ctx.proj, ctx.seed, lora_a,
                                             lora_b, None, ctx.needs_input_grad[0])
        return _input_grad(dn2, x, ctx.norm, rstd), None, None, None, grad_a, grad_b


class GatedLoraA(torch.autograd.Function):
    """A gated MLP up to its down projection: `act = silu(gate(n)) * up(n)` (n = x or norm(x)), gate and up LoRA
    linears, and the down projection's LoRA-A product `h = drop(act) A^T / (1 - p)`. Returns (act, h) for
    `LinearLoraB`.

    Arguments: x, the (gate, up, down) `Projection`s, their dropout seeds, `recompute`, the `Norm` or None, then
    A_gate, B_gate, A_up, B_up, A_down. Saves x, the rank-r intermediates and the gate and up outputs, which
    backward needs for SwiGLU's gradient; with `recompute` it saves neither output (2 x [tokens, intermediate],
    about half of what a decoder layer keeps) and backward runs the two GEMMs again from x and the saved
    intermediates. The product `silu(gate) * up` is never saved. This is the last node of a decoder layer to save
    tensors, so a checkpointed layer's recompute stops here (torch stops as soon as every saved tensor is back)
    and never repeats the down projection's GEMM.
    """

    @staticmethod
    def forward(ctx, x, projections, seeds, recompute, norm, *lora):
        n2, _ = _node_input(x, norm)  # [N, hidden]
        (gate_proj, up_proj, down_proj), (gate_seed, up_seed, down_seed) = projections, seeds
        gate_a, gate_b, up_a, up_b, down_a = lora
        gate, gate_h = _lora_forward(n2, gate_proj, gate_seed, gate_a, gate_b)
        up, up_h = _lora_forward(n2, up_proj, up_seed, up_a, up_b)
        act = compiled(swiglu, gate)(gate, up)  # [N, intermediate]
        h = lora_a_product(act, down_a, down_proj.dropout, down_seed).mul_(1.0 / (1.0 - down_proj.dropout))
        outputs = () if recompute else (gate, up)
        ctx.save_for_backward(x, gate_h, up_h, *outputs, *lora)
        ctx.projections, ctx.seeds, ctx.recompute, ctx.norm = projections, seeds, recompute, norm
        return act.view(*x.shape[:-1], act.shape[-1]), h

    @staticmethod
    def backward(ctx, dact, dh):
        (gate_proj, up_proj, down_proj), (gate_seed, up_seed, down_seed) = ctx.projections, ctx.seeds
        x, gate_h, up_h, *rest = ctx.saved_tensors
        n2, rstd = _node_input(x, ctx.norm)
        if ctx.recompute:
            gate_a, gate_b, up_a, up_b, down_a = rest
            gate = _base_plus_lora_b(n2, gate_proj, gate_h, gate_b)  # bitwise the forward's outputs
            up = _base_plus_lora_b(n2, up_proj, up_h, up_b)
        else:
            gate, up, gate_a, gate_b, up_a, up_b, down_a = rest
        p = down_proj.dropout
        act = compiled(swiglu, gate)(gate, up)
        dh = dh.to(_grad_dtype(dh)) * (1.0 / (1.0 - p))
        grad_down_a = lora_a_grad(dh, act, p, down_seed)  # [r, intermediate]
        # in place: act feeds only LinearLoraB, whose backward made dact, so no one else reads it (and backward's
        # peak, the highest of the whole step, is one [tokens, intermediate] tensor lower)
        dact2 = dact.view_as(act)
        add_lora_input_grad_(dh, down_a, p, down_seed, dact2)  # [N, intermediate]
        del act
        dgate, dup = compiled(swiglu_backward, gate)(dact2, gate, up)
        del gate, up, dact2
        need_dx = ctx.needs_input_grad[0]
        dn2, grad_gate_a, grad_gate_b = _lora_backward(n2, dgate, gate_h, gate_proj, gate_seed, gate_a, gate_b, None,
                                                       need_dx)
        dn2, grad_up_a, grad_up_b = _lora_backward(n2, dup, up_h, up_proj, up_seed, up_a, up_b, dn2, need_dx)
        return (_input_grad(dn2, x, ctx.norm, rstd), None, None, None, None, grad_gate_a, grad_gate_b, grad_up_a,
                grad_up_b, grad_down_a.to(down_a.dtype))


class LinearLoraB(torch.autograd.Function):
    """`y = x W^T + b + scale * h B^T`: the frozen base linear plus the LoRA-B product of `h` (from GatedLoraA).

    Arguments: x, h, the `Projection`, B. It saves nothing through autograd (h, a [N, r] tensor, and the
    parameter B are kept on ctx): a saved tensor would make checkpoint recompute run this GEMM again.
    """

    @staticmethod
    def forward(ctx, x, h, proj, lora_b):
        y = _base_plus_lora_b(x.view(-1, x.shape[-1]), proj, h, lora_b)  # [N, out]
        ctx.h, ctx.lora_b, ctx.proj, ctx.x_shape = h, lora_b, proj, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_b, dh = _lora_b_backward(dy2, ctx.h, ctx.proj, ctx.lora_b, 1.0)
        dx = (dy2 @ ctx.proj.weight).view(ctx.x_shape)
        return dx, dh.to(ctx.h.dtype), None, grad_b.to(ctx.lora_b.dtype)


class RMSNormFunction(torch.autograd.Function):
    """An RMSNorm of a frozen weight, of the formula `norm.formula`; saves x and 1/rms only.

    Arguments: x, the `Norm`.
    """

    @staticmethod
    def forward(ctx, x, norm):
        y, rstd = norm.forward(x)
        ctx.save_for_backward(x, rstd)
        ctx.norm = norm
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd = ctx.saved_tensors
        return ctx.norm.backward(dy, x, rstd), None


class RotaryFunction(torch.autograd.Function):
    """Rotary position embedding `x * cos + rotate_half(x) * sin`, one kernel each way; saves cos and sin only."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return compiled(rotary, x)(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return compiled(rotary_backward, dy)(dy, cos, sin), None, None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' (and our InternLM2's) `apply_rotary_pos_emb`, through `RotaryFunction`."""
    cos = cos.unsqueeze(unsqueeze_dim).to(q.dtype)
    sin = sin.unsqueeze(unsqueeze_dim).to(q.dtype)
    return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)
