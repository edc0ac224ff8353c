"""A faster LoRA training step on a PEFT-wrapped LLM, with PEFT's parameters, semantics and file format.

PEFT's LoRA layer runs the adapter beside the base layer as separate operations: the input is cast to the
adapter's float32, dropped out, sent through `lora_A` and `lora_B`, scaled, and added to the base output, each
step a full pass over a [tokens, features] tensor with its own saved activations. On a 7B model that is most of
the gap between a frozen model's step and a LoRA step. `enable_fast_lora` swaps in fused forward paths that
read the same `lora_A` / `lora_B` parameters:

- each LoRA linear is one autograd node: the base output with the adapter's low-rank update added in place,
  one input gradient for base and adapter together, no gradient for the frozen weight, and only the input and
  the rank-r intermediate saved (the dropout mask is redrawn from a seed in backward, not stored; on CUDA it is
  drawn inside the adapter's Triton products, `internvl.lora.kernels`);
- a gated MLP (`down(silu(gate(x)) * up(x))`) runs gate, up and SwiGLU as one node and recomputes
  `silu(g) * u` in backward, so the [tokens, intermediate] product is never stored, and a checkpointed layer's
  recompute stops before the down projection's GEMM; it can also recompute g and u themselves (see below);
- RMSNorm saves only its input and the per-row scale, and the LoRA nodes it feeds save that same input
  rather than the norm's output (recomputed in backward); rotary embedding is one kernel each way, saving nothing
  but cos and sin;
- with `labels`, the loss is computed in chunks of tokens straight from the last hidden state, so the
  [tokens, vocab] logits never exist in full (the output has `logits=None`).

The optimizer, `save_pretrained` and merging see PEFT's own modules and parameters throughout; `restore()`
puts PEFT's forwards back. Dropout keeps PEFT's semantics (an independent mask per LoRA module, on the adapter's
input only); the masks come from seeds drawn from the CPU generator, which gradient checkpointing restores, so
a recomputed layer redraws the same masks.

`fit_checkpointing` picks, within a memory budget, which decoder layers keep their activations, which keep all
but their MLP's two widest tensors (recomputed by two GEMMs in backward) and which are checkpointed.

    model = add_lora(llm, ...)                      # a PeftModel, as for the plain path
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    handle = maybe_enable_fast_lora(model)          # None (and a logged reason) off CUDA or when unsupported
    fit_checkpointing(model, lambda: model(**batch).loss.backward(), budget_bytes)  # or set_checkpointed_layers
    ...                                             # train; save_pretrained as usual
    handle.restore()

Measured figures (one H200, InternVL2.5-8B's and InternVL3-8B's LLMs): bench/README.md.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

logger = logging.getLogger(__name__)

# Child names of gated MLPs, (gate, up, down): LLaMA-style (LLaMA, Qwen2/3, Phi3's split variants) and InternLM2.
GATED_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
IGNORE_INDEX = -100
# Modeling modules whose `apply_rotary_pos_emb(q, k, cos, sin, ...)` is the plain full-width rotation (Phi3's
# rotates part of the head, GPT-OSS's pairs channels differently: theirs are left alone).
STANDARD_ROTARY_MODULES = frozenset({
    "internvl.model.internlm2",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.qwen3_moe.modeling_qwen3_moe",
})
# Set on RMSNormFunction's outputs: (input, weight, eps), so the LoRA nodes they feed can save the input instead.
NORM_INPUT = "_fast_lora_rms_norm_input"
# Set on a fused gated MLP to save memory: its backward recomputes the gate and up outputs (see GatedLoraA).
RECOMPUTE_GATE_UP = "fast_lora_recompute_gate_up"


# ----- elementwise pieces ---------------------------------------------------------------------------------
# Written as plain torch; on CUDA they run through torch.compile, which fuses each into one kernel (eager torch
# would make a pass over the tensor per operation). On CPU they run eagerly, so tests need no compiler.


def _rms_norm_forward(x, weight, eps):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def _rms_norm_backward(dy, x, weight, rstd):
    normed = x.float() * rstd
    dnormed = (dy * weight).float()
    return (rstd * (dnormed - normed * (dnormed * normed).mean(-1, keepdim=True))).to(x.dtype)


def _swiglu_forward(gate, up):
    return F.silu(gate) * up


def _swiglu_backward(dact, gate, up):
    gate32, dact32 = gate.float(), dact.float()
    sig = torch.sigmoid(gate32)
    dup = dact32 * gate32 * sig
    dgate = dact32 * up.float() * sig * (1 + gate32 * (1 - sig))
    return dgate.to(gate.dtype), dup.to(up.dtype)


def _rotary_forward(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _rotary_backward(dy, cos, sin):
    # The transpose of x -> rotate_half(x) * sin is z -> (z2, -z1) of z = dy * sin.
    z1, z2 = (dy * sin).chunk(2, dim=-1)
    return dy * cos + torch.cat((z2, -z1), dim=-1)


_compiled: dict = {}


def _kernel(fn, like: torch.Tensor):
    """`fn` compiled for CUDA tensors (once per function), `fn` itself elsewhere."""
    if not like.is_cuda:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True)
    return _compiled[fn]


# ----- fused LoRA linears ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """A frozen linear layer and its LoRA adapter's constants, as the fused functions see them."""

    weight: torch.Tensor  # [out, in]; frozen
    bias: torch.Tensor | None  # frozen
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    dropout: float  # the adapter-input dropout rate, 0.0 when not training


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """`x` times the 0/1 keep-mask (keep probability 1 - p) of `seed`; no 1/(1-p) scaling."""
    if x.is_cuda:  # one Triton pass, the mask drawn in-register
        from internvl.lora.kernels import apply_keep_mask

        return apply_keep_mask(x, p, seed)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return x * torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The 0/1 keep-mask that the fused functions apply for dropout rate `p` and `seed`, shaped like `like`."""
    return _dropped(torch.ones_like(like), p, seed)


def _kernels_for(x: torch.Tensor, p: float):
    """`internvl.lora.kernels` when its dropout-fused products take x, else None.

    They draw the mask as they read x; elsewhere the mask is a pass of its own. They multiply 16-bit inputs:
    float32 training keeps torch's exact float32 products.
    """
    if p == 0.0 or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    from internvl.lora import kernels  # imports triton: CUDA only

    return kernels if kernels.supports(x) else None


def _lora_a_product(x2, lora_a, p: float, seed: int):
    """drop(x2) A^T (no 1/(1-p)) for x2 [N, in], in x2's dtype."""
    lora_a = lora_a.to(x2.dtype)
    if kernels := _kernels_for(x2, p):
        return kernels.lora_a_product(x2, lora_a, p, seed)
    return (x2 if p == 0.0 else _dropped(x2, p, seed)) @ lora_a.t()


def _lora_a_grad(dh, x2, p: float, seed: int):
    """dh^T drop(x2) (no 1/(1-p)): the gradient of A, [r, in]."""
    if kernels := _kernels_for(x2, p):
        return kernels.lora_a_grad(dh, x2, p, seed)
    return dh.t() @ (x2 if p == 0.0 else _dropped(x2, p, seed))


def _add_lora_input_grad_(dh, lora_a, p: float, seed: int, base) -> None:
    """base += drop(dh A) (no 1/(1-p)): the adapter's share of the input gradient, added in place."""
    lora_a = lora_a.to(dh.dtype)
    if p == 0.0:
        base.addmm_(dh, lora_a)
    elif kernels := _kernels_for(base, p):
        kernels.add_lora_input_grad(dh, lora_a, p, seed, base, out=base)
    else:
        base.add_(_dropped(dh @ lora_a, p, seed))


def _base_plus_lora_b(x2, proj: Projection, h, lora_b):
    """x2 W^T + b + scale * h B^T: the frozen base output with the adapter's low-rank update added in place."""
    return F.linear(x2, proj.weight, proj.bias).addmm_(h, lora_b.to(x2.dtype).t(), alpha=proj.scale)


def _lora_forward(x2, proj: Projection, seed, lora_a, lora_b):
    """Base output with the adapter's update added in place, and the rank-r intermediate h backward needs."""
    h = _lora_a_product(x2, lora_a, proj.dropout, seed)  # [N, r]
    if proj.dropout:
        h.mul_(1.0 / (1.0 - proj.dropout))  # inverted dropout's scale, on the small tensor
    return _base_plus_lora_b(x2, proj, h, lora_b), h  # [N, out]


def _lora_backward(x2, dy2, h, proj: Projection, seed, lora_a, lora_b, dx2, need_dx: bool):
    """Gradients of `_lora_forward`: the adapter's (dA, dB), and dx accumulated into `dx2` (None: a new one)."""
    grad_b = (dy2.t() @ h).mul_(proj.scale)  # [out, r]
    dh = (dy2 @ lora_b.to(dy2.dtype)).mul_(proj.scale / (1.0 - proj.dropout))  # [N, r]
    grad_a = _lora_a_grad(dh, x2, proj.dropout, seed)  # [r, in]
    if need_dx:
        dx2 = dy2 @ proj.weight if dx2 is None else dx2.addmm_(dy2, proj.weight)  # the frozen base's share
        _add_lora_input_grad_(dh, lora_a, proj.dropout, seed, dx2)
    return dx2, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)


def _input_to_save(ctx, x: torch.Tensor) -> torch.Tensor:
    """What a LoRA node saves of its input x: x, or when x is an RMSNorm's output, the norm's input.

    The norm saves its input anyway, so a node fed by a norm keeps no tensor of its own alive (two [tokens,
    hidden] tensors less per decoder layer) and backward recomputes x from it: one elementwise pass per node the
    norm feeds (three where q, k and v are separate projections, one for InternLM2's packed wqkv).
    """
    source = getattr(x, NORM_INPUT, None)
    ctx.norm = None if source is None else source[1:]
    return x if source is None else source[0]


def _saved_input(ctx, saved: torch.Tensor) -> torch.Tensor:
    """The node's input as [tokens, features], from what `_input_to_save` kept."""
    if ctx.norm is not None:
        weight, eps = ctx.norm
        saved = _kernel(_rms_norm_forward, saved)(saved, weight, eps)[0]  # bitwise the forward's output
    return saved.reshape(-1, saved.shape[-1])


class LinearLora(torch.autograd.Function):
    """`y = x W^T + b + scale * drop(x) A^T B^T` for a frozen linear layer and its LoRA adapter.

    Arguments: x, the `Projection`, the dropout seed, A, B (only x and the adapter get gradients). Saves x (or
    the norm input it came from) and the rank-r intermediate.
    """

    @staticmethod
    def forward(ctx, x, proj, seed, lora_a, lora_b):
        y, h = _lora_forward(x.reshape(-1, x.shape[-1]), proj, seed, lora_a, lora_b)
        ctx.save_for_backward(_input_to_save(ctx, x), h, lora_a, lora_b)
        ctx.proj, ctx.seed, ctx.x_shape = proj, seed, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        saved, h, lora_a, lora_b = ctx.saved_tensors
        dx2, grad_a, grad_b = _lora_backward(_saved_input(ctx, saved), dy.reshape(-1, dy.shape[-1]), h, ctx.proj,
                                             ctx.seed, lora_a, lora_b, None, ctx.needs_input_grad[0])
        return None if dx2 is None else dx2.view(ctx.x_shape), None, None, grad_a, grad_b


class GatedLoraA(torch.autograd.Function):
    """A gated MLP up to its down projection: `act = silu(gate(x)) * up(x)`, gate and up LoRA linears, and the
    down projection's LoRA-A product `h = drop(act) A^T / (1 - p)`. Returns (act, h) for `LinearLoraB`.

    Arguments: x, the (gate, up, down) `Projection`s, their dropout seeds, `recompute`, then A_gate, B_gate,
    A_up, B_up, A_down. Saves x, the rank-r intermediates and the gate and up outputs, which backward needs for
    SwiGLU's gradient; with `recompute` it saves neither output (2 x [tokens, intermediate], about half of what
    a decoder layer keeps) and backward runs the two GEMMs again from x and the saved intermediates.
    The product `silu(gate) * up` is never saved. This is the last node of a decoder layer to save tensors, so
    a checkpointed layer's recompute stops here (torch stops as soon as every saved tensor is back) and never
    repeats the down projection's GEMM.
    """

    @staticmethod
    def forward(ctx, x, projections, seeds, recompute, *lora):
        x2 = x.reshape(-1, x.shape[-1])  # [N, hidden]
        (gate_proj, up_proj, down_proj), (gate_seed, up_seed, down_seed) = projections, seeds
        gate_a, gate_b, up_a, up_b, down_a = lora
        gate, gate_h = _lora_forward(x2, gate_proj, gate_seed, gate_a, gate_b)
        up, up_h = _lora_forward(x2, up_proj, up_seed, up_a, up_b)
        act = _kernel(_swiglu_forward, gate)(gate, up)  # [N, intermediate]
        h = _lora_a_product(act, down_a, down_proj.dropout, down_seed).mul_(1.0 / (1.0 - down_proj.dropout))
        outputs = () if recompute else (gate, up)
        ctx.save_for_backward(_input_to_save(ctx, x), gate_h, up_h, *outputs, *lora)
        ctx.projections, ctx.seeds, ctx.recompute, ctx.x_shape = projections, seeds, recompute, x.shape
        return act.view(*x.shape[:-1], act.shape[-1]), h

    @staticmethod
    def backward(ctx, dact, dh):
        (gate_proj, up_proj, down_proj), (gate_seed, up_seed, down_seed) = ctx.projections, ctx.seeds
        saved, gate_h, up_h, *rest = ctx.saved_tensors
        x2 = _saved_input(ctx, saved)
        if ctx.recompute:
            gate_a, gate_b, up_a, up_b, down_a = rest
            gate = _base_plus_lora_b(x2, gate_proj, gate_h, gate_b)  # bitwise the forward's outputs
            up = _base_plus_lora_b(x2, up_proj, up_h, up_b)
        else:
            gate, up, gate_a, gate_b, up_a, up_b, down_a = rest
        p = down_proj.dropout
        act = _kernel(_swiglu_forward, gate)(gate, up)
        dh = dh * (1.0 / (1.0 - p))
        grad_down_a = _lora_a_grad(dh, act, p, down_seed)  # [r, intermediate]
        # in place: act feeds only LinearLoraB, whose backward made dact, so no one else reads it (and backward's
        # peak, the highest of the whole step, is one [tokens, intermediate] tensor lower)
        dact2 = dact.view_as(act)
        _add_lora_input_grad_(dh, down_a, p, down_seed, dact2)  # [N, intermediate]
        del act
        dgate, dup = _kernel(_swiglu_backward, gate)(dact2, gate, up)
        del gate, up, dact2
        need_dx = ctx.needs_input_grad[0]
        dx2, grad_gate_a, grad_gate_b = _lora_backward(x2, dgate, gate_h, gate_proj, gate_seed, gate_a, gate_b, None,
                                                       need_dx)
        dx2, grad_up_a, grad_up_b = _lora_backward(x2, dup, up_h, up_proj, up_seed, up_a, up_b, dx2, need_dx)
        dx = None if dx2 is None else dx2.view(ctx.x_shape)
        return (dx, None, None, None, grad_gate_a, grad_gate_b, grad_up_a, grad_up_b,
                grad_down_a.to(down_a.dtype))


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
        grad_b = (dy2.t() @ ctx.h).mul_(ctx.proj.scale)  # [out, r]
        dh = (dy2 @ ctx.lora_b.to(dy2.dtype)).mul_(ctx.proj.scale)  # [N, r]
        dx = (dy2 @ ctx.proj.weight).view(ctx.x_shape)
        return dx, dh, None, grad_b.to(ctx.lora_b.dtype)


class RMSNormFunction(torch.autograd.Function):
    """`weight * (x / rms(x))` computed in float32, as transformers' RMSNorm; saves x and 1/rms only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _kernel(_rms_norm_forward, x)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        setattr(y, NORM_INPUT, (x, weight, eps))  # for the LoRA nodes y feeds: see `_input_to_save`
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        return _kernel(_rms_norm_backward, x)(dy, x, weight, rstd), None, None


class RotaryFunction(torch.autograd.Function):
    """Rotary position embedding `x * cos + rotate_half(x) * sin`, one kernel each way; saves cos and sin only."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _kernel(_rotary_forward, x)(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _kernel(_rotary_backward, dy)(dy, cos, sin), None, None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' (and our InternLM2's) `apply_rotary_pos_emb`, through `RotaryFunction`."""
    cos = cos.unsqueeze(unsqueeze_dim).to(q.dtype)
    sin = sin.unsqueeze(unsqueeze_dim).to(q.dtype)
    return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)


# ----- chunked linear + cross-entropy ---------------------------------------------------------------------


def _cross_entropy_chunk(logit_parts, targets, divisor):
    """Summed cross-entropy of logits given as column blocks, and the gradient of `sum / divisor` for each block.

    The blocks stay in the GEMM's dtype; the arithmetic runs in float32 on the fly (one fused kernel on CUDA),
    so no float32 copy of the [rows, vocab] logits is ever made.
    """
    parts = [part.float() for part in logit_parts]
    row_max = torch.stack([part.amax(-1) for part in parts]).amax(0)  # [n]
    sum_exp = sum(torch.exp(part - row_max[:, None]).sum(-1) for part in parts)
    lse = row_max + torch.log(sum_exp)
    target_logit, grads, start = torch.zeros_like(lse), [], 0
    for part in parts:
        columns = torch.arange(start, start + part.shape[1], device=part.device)
        is_target = columns[None, :] == targets[:, None]  # [n, width]
        target_logit = target_logit + torch.where(is_target, part, 0.0).sum(-1)
        grads.append(((torch.exp(part - lse[:, None]) - is_target.float()) / divisor).to(logit_parts[0].dtype))
        start += part.shape[1]
    return (lse - target_logit).sum(), grads


class LinearCrossEntropy(torch.autograd.Function):
    """Next-token cross-entropy of `hidden @ weight.T` without the full logits; gradient for hidden only.

    Arguments: hidden [N, H] and targets [N] (already shifted; IGNORE_INDEX skipped), the frozen head weight
    [V, H], the divisor of the summed loss, and the rows per chunk. The gradient is computed chunk by chunk in
    forward (the chunk's logits are then freed), so backward is one multiply.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_rows):
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # A vocabulary that is no multiple of 8 (92553, 151674) gives the logits a row stride on which cuBLAS
        # falls back to slow unaligned kernels; the head's first `aligned` rows keep every product aligned.
        aligned = weight.shape[0] - weight.shape[0] % 8
        blocks = [weight[:aligned], weight[aligned:]] if aligned < weight.shape[0] else [weight]
        chunk_loss = _kernel(_cross_entropy_chunk, hidden)
        # a tensor, not a float: the compiled kernel would otherwise be specialised (recompiled) per divisor
        divisor_t = torch.tensor(divisor, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_rows):
            index = rows[start : start + chunk_rows]
            h = hidden[index]
            chunk_sum, logit_grads = chunk_loss([h @ block.t() for block in blocks], targets[index], divisor_t)
            loss += chunk_sum
            if grad is not None:
                grad_rows = logit_grads[0] @ blocks[0]
                for logit_grad, block in zip(logit_grads[1:], blocks[1:]):
                    grad_rows.addmm_(logit_grad, block)
                grad[index] = grad_rows
        ctx.save_for_backward(grad)
        return loss / divisor

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return grad * dloss.to(grad.dtype), None, None, None, None


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, chunk_elements=2**24):
    """transformers' causal-LM loss (shift labels left, ignore -100, mean or sum / `num_items_in_batch`) of
    `hidden @ weight.T`, computed `chunk_elements` logits at a time."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)  # [N]
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum().clamp(min=1).item()
    else:
        divisor = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    return LinearCrossEntropy.apply(hidden2, weight, targets, float(divisor), chunk_rows)


# ----- the swap -------------------------------------------------------------------------------------------


def _lora_parts(module: LoraLinear):
    """(Projection, A, B) of a LoRA linear's active adapter, for the current training mode."""
    name = module.active_adapters[0]
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    base = module.get_base_layer()
    proj = Projection(base.weight, base.bias, float(module.scaling[name]), float(p))
    return proj, module.lora_A[name].weight, module.lora_B[name].weight


def _seed() -> int:
    return int(torch.randint(2**31 - 1, ()).item())  # Triton's Philox takes a 32-bit seed


def _runs_peft(module: LoraLinear) -> bool:
    """True while PEFT's own path must run: adapters disabled or merged (both can change after the swap)."""
    return module.disable_adapters or module.merged


def _fused_lora_forward(module: LoraLinear, original):
    def forward(x, *args, **kwargs):
        if _runs_peft(module) or args or kwargs:
            return original(x, *args, **kwargs)
        proj, lora_a, lora_b = _lora_parts(module)
        return LinearLora.apply(x, proj, _seed(), lora_a, lora_b)

    return forward


def _fused_mlp_forward(mlp: nn.Module, gate: LoraLinear, up: LoraLinear, down: LoraLinear, original):
    def forward(x):
        if any(_runs_peft(m) for m in (gate, up, down)):
            return original(x)
        (gate_proj, gate_a, gate_b), (up_proj, up_a, up_b), (down_proj, down_a, down_b) = (
            _lora_parts(m) for m in (gate, up, down))
        recompute = getattr(mlp, RECOMPUTE_GATE_UP, False)
        act, h = GatedLoraA.apply(x, (gate_proj, up_proj, down_proj), (_seed(), _seed(), _seed()), recompute,
                                  gate_a, gate_b, up_a, up_b, down_a)
        return LinearLoraB.apply(act, h, down_proj, down_b)

    return forward


def _fused_rms_norm_forward(norm: nn.Module):
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))

    def forward(x):
        return RMSNormFunction.apply(x, norm.weight, eps)

    return forward


def _fused_loss_forward(llm: nn.Module, head: nn.Linear, original):
    def forward(*args, labels=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        outputs = llm.get_decoder()(*args, **kwargs)
        loss = linear_cross_entropy(outputs.last_hidden_state, head.weight, labels, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    return forward


def unsupported_reasons(model: nn.Module) -> list[str]:
    """Why `enable_fast_lora` cannot run on `model`; empty when it can."""
    if not isinstance(model, PeftModel):
        return [f"{type(model).__name__} is not a PeftModel (wrap it with internvl.lora.inject.add_lora first)"]
    reasons = []
    if len(model.peft_config) != 1 or len(model.active_adapters) != 1:
        reasons.append(f"needs exactly one adapter, found {sorted(model.peft_config)}")
    config = model.peft_config[model.active_adapters[0]]
    if getattr(config, "peft_type", None) is None or config.peft_type.value != "LORA":
        return reasons + [f"needs a LoRA adapter, found {config.peft_type}"]
    for option in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if getattr(config, option, False):
            reasons.append(f"{option}=True is not supported")
    lora_modules = [m for m in model.modules() if type(m) is LoraLinear]
    if not lora_modules:
        reasons.append("no LoRA nn.Linear layers to accelerate")
    for module in lora_modules:
        if module.lora_variant or not isinstance(module.get_base_layer(), nn.Linear):
            reasons.append(f"{type(module.get_base_layer()).__name__} base layer or LoRA variant in a LoRA layer")
            break
        if module.get_base_layer().weight.requires_grad:
            reasons.append("a LoRA layer's base weight is trainable; the fused path computes no base-weight grad")
            break
    return reasons


# Modeling modules whose apply_rotary_pos_emb is swapped: module -> (its own function, handles using the swap).
_ROTARY_SWAPS: dict[ModuleType, tuple[object, int]] = {}


class FastLoRA:
    """The handle `enable_fast_lora` returns: what it swapped, and `restore()` to put PEFT's forwards back.

    Also a context manager: `with enable_fast_lora(model): ...` restores on exit.
    """

    def __init__(self, model: PeftModel):
        self.model = model
        self._swapped: list[nn.Module] = []
        self._rotary: list[ModuleType] = []  # modeling modules whose apply_rotary_pos_emb this handle swapped
        self.counts = {"lora_linears": 0, "gated_mlps": 0, "rms_norms": 0, "fused_loss": 0, "rotary": 0}

    def _swap(self, module: nn.Module, forward, kind: str) -> None:
        module.forward = forward  # an instance attribute; deleting it uncovers the class's forward again
        self._swapped.append(module)
        self.counts[kind] += 1

    def _swap_rotary(self, modeling: ModuleType) -> None:
        # The attention layers call their modeling module's `apply_rotary_pos_emb` by name, so the function is
        # swapped in that module, for every model of that class in the process: the module's own function comes
        # back when the last handle using the swap restores.
        original, users = _ROTARY_SWAPS.get(modeling, (modeling.apply_rotary_pos_emb, 0))
        _ROTARY_SWAPS[modeling] = (original, users + 1)
        modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
        self._rotary.append(modeling)
        self.counts["rotary"] += 1

    def restore(self) -> None:
        """Put every swapped module's own forward, and each modeling module's rotary function, back."""
        for module in reversed(self._swapped):
            del module.forward
        for modeling in reversed(self._rotary):
            original, users = _ROTARY_SWAPS.pop(modeling)
            if users > 1:
                _ROTARY_SWAPS[modeling] = (original, users - 1)
            else:
                modeling.apply_rotary_pos_emb = original
        self._swapped.clear()
        self._rotary.clear()

    def __enter__(self) -> FastLoRA:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        swapped = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in self.counts.items())
        return f"FastLoRA({swapped})"


def enable_fast_lora(model: PeftModel) -> FastLoRA:
    """Swap fused forward paths into a PEFT-LoRA-wrapped causal LM; returns the handle that undoes it.

    Raises ValueError naming every reason when the configuration is outside what the fused path computes
    (DoRA, several adapters, a LoRA bias, a trainable base weight, ...). LoRA layers of other kinds (embeddings,
    target parameters) keep PEFT's forward. The loss is fused only when the output head is a frozen bias-free
    `nn.Linear`; RMSNorm only when its weight is frozen.
    """
    reasons = unsupported_reasons(model)
    if reasons:
        raise ValueError("Fast LoRA cannot accelerate this model: " + "; ".join(reasons))
    llm = model.get_base_model()
    if any("forward" in vars(m) for m in llm.modules()):
        raise ValueError("a module's forward is already swapped (fast LoRA enabled twice?); restore() it first")
    handle = FastLoRA(model)
    in_mlp = set()
    silu = getattr(llm.config, "hidden_act", None) in ("silu", "swish")  # the MLPs' act_fn is built from it
    for mlp in llm.modules():
        for names in GATED_MLP_NAMES:
            parts = [getattr(mlp, name, None) for name in names]
            if silu and hasattr(mlp, "act_fn") and all(type(p) is LoraLinear for p in parts):
                handle._swap(mlp, _fused_mlp_forward(mlp, *parts, original=mlp.forward), "gated_mlps")
                in_mlp.update(parts)
    for module in llm.modules():
        if type(module) is LoraLinear and module not in in_mlp:
            handle._swap(module, _fused_lora_forward(module, module.forward), "lora_linears")
        elif (
            type(module).__name__.endswith("RMSNorm")
            and isinstance(getattr(module, "weight", None), nn.Parameter)
            and not module.weight.requires_grad
            and isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float)
        ):
            handle._swap(module, _fused_rms_norm_forward(module), "rms_norms")
    handle.counts["lora_linears"] += 3 * handle.counts["gated_mlps"]
    for name in sorted({type(m).__module__ for m in checkpointable_layers(llm)} & STANDARD_ROTARY_MODULES):
        handle._swap_rotary(sys.modules[name])
    head = llm.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        handle._swap(llm, _fused_loss_forward(llm, head, llm.forward), "fused_loss")
    else:
        logger.info("fast LoRA: the output head %s is not a frozen bias-free Linear; loss left as is", type(head))
    return handle


def maybe_enable_fast_lora(model: nn.Module) -> FastLoRA | None:
    """`enable_fast_lora` where it helps (CUDA, a supported configuration); otherwise None and a logged reason."""
    device = next(model.parameters()).device
    reasons = [f"parameters are on {device}, the fused path is for CUDA"] if device.type != "cuda" else []
    reasons = reasons or unsupported_reasons(model)
    if reasons:
        logger.warning("Fast LoRA off, training runs PEFT's own layers: %s", "; ".join(reasons))
        return None
    return enable_fast_lora(model)


# ----- checkpointing policy -------------------------------------------------------------------------------


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that carry transformers' per-layer `gradient_checkpointing` flag, in order."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@dataclass(frozen=True)
class CheckpointPlan:
    """How the decoder layers spend memory, counted from the last layer back: `keep` layers save everything,
    the `recompute_mlp` layers before them save all but their MLP's gate and up outputs (recomputed in
    backward by two GEMMs), and every earlier layer is checkpointed (its whole forward recomputed)."""

    keep: int = 0
    recompute_mlp: int = 0

    def __str__(self) -> str:
        return f"{self.keep} kept, {self.recompute_mlp} MLP-recomputed, the rest checkpointed"


def set_checkpointed_layers(model: nn.Module, plan: CheckpointPlan) -> None:
    """Apply `plan` to the model's decoder layers (gradient checkpointing must be enabled).

    The last layers are the ones to keep: their activations are freed first in backward, before the
    checkpointed layers recompute theirs. MLP recompute acts on `enable_fast_lora`'s fused gated MLPs.
    """
    layers = checkpointable_layers(model)
    if layers and not hasattr(layers[0], "_gradient_checkpointing_func"):
        raise ValueError("enable gradient checkpointing first (model.gradient_checkpointing_enable())")
    for i, layer in enumerate(layers):
        from_end = len(layers) - i
        layer.gradient_checkpointing = from_end > plan.keep + plan.recompute_mlp
        for module in layer.modules():
            if hasattr(module, "act_fn"):
                setattr(module, RECOMPUTE_GATE_UP, plan.keep < from_end <= plan.keep + plan.recompute_mlp)


def fit_checkpointing(model: nn.Module, train_step, budget_bytes: int, probe: int = 2) -> CheckpointPlan:
    """The `CheckpointPlan` that fits in `budget_bytes` of peak CUDA memory and recomputes least; applied.

    `train_step()` runs one forward and backward (its gradients are cleared afterwards). It runs with every
    layer checkpointed, with `probe` layers MLP-recomputed and with `probe` layers kept, to measure what each
    costs. Layers move from checkpointed to MLP-recomputed first (on a 7B model that saves about 2 ms of
    recompute per 0.15 GiB, against 1.3 ms per 0.22 GiB for MLP-recomputed to kept), then from MLP-recomputed
    to kept with what is left; the plan is checked with one more step and shrunk until its peak fits.
    """

    def peak(plan: CheckpointPlan) -> int:
        set_checkpointed_layers(model, plan)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    layers = len(checkpointable_layers(model))
    probe = min(probe, layers)
    base = peak(CheckpointPlan())
    per_recompute = max(1, (peak(CheckpointPlan(recompute_mlp=probe)) - base) // max(probe, 1))
    per_keep = max(per_recompute + 1, (peak(CheckpointPlan(keep=probe)) - base) // max(probe, 1))
    recompute = max(0, min(layers, (budget_bytes - base) // per_recompute))
    keep = max(0, min(recompute, (budget_bytes - base - recompute * per_recompute) // (per_keep - per_recompute)))
    plan = CheckpointPlan(keep, recompute - keep)
    while (plan.keep or plan.recompute_mlp) and peak(plan) > budget_bytes:
        plan = (CheckpointPlan(plan.keep - 1, plan.recompute_mlp + 1) if plan.keep
                else CheckpointPlan(0, plan.recompute_mlp - 1))
    set_checkpointed_layers(model, plan)
    return plan
