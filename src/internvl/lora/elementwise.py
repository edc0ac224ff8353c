"""The elementwise pieces of the fused training path, forward and backward, written as plain torch.

On CUDA each runs through `torch.compile`, which fuses it into one kernel (eager torch makes a pass over the
tensor per operation); on the CPU they run eagerly, so the tests need no compiler. Every backward is the closed
form of its forward's gradient, computed in float32 and cast back to the input's dtype as autograd would.

RMSNorm comes in the two formulas the arch table names (`internvl.archs.LLMArch.rms_norm`):
- "llama" (LLaMA, Qwen, Phi3, InternLM2): `weight * normed.to(dtype)`, the weight multiplying in the input's dtype;
- "gpt_oss" (GPT-OSS, as T5): `(weight * normed).to(dtype)`, the weight multiplying in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rstd(x32: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]


def rms_norm_llama(x, weight, eps):
    """(y, 1/rms) of the LLaMA RMSNorm: the weight multiplies the normalised input cast back to x's dtype."""
    x32 = x.float()
    rstd = _rstd(x32, eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_gpt_oss(x, weight, eps):
    """(y, 1/rms) of GPT-OSS's RMSNorm: the weight multiplies in float32, the product is cast to x's dtype."""
    x32 = x.float()
    rstd = _rstd(x32, eps)
    return (weight * (x32 * rstd)).to(x.dtype), rstd


def _rms_norm_input_grad(dnormed, x, rstd):
    """dx from d(normed) (float32), for normed = x * rstd with rstd = 1/rms(x)."""
    normed = x.float() * rstd
    return (rstd * (dnormed - normed * (dnormed * normed).mean(-1, keepdim=True))).to(x.dtype)


def rms_norm_llama_backward(dy, x, weight, rstd):
    # autograd multiplies dy by the weight in dy's dtype, then casts to float32 through `.to(x.dtype)`'s backward
    return _rms_norm_input_grad((dy * weight).float(), x, rstd)


def rms_norm_gpt_oss_backward(dy, x, weight, rstd):
    return _rms_norm_input_grad(dy.float() * weight.float(), x, rstd)


RMS_NORMS = {  # formula name -> (forward, backward)
    "llama": (rms_norm_llama, rms_norm_llama_backward),
    "gpt_oss": (rms_norm_gpt_oss, rms_norm_gpt_oss_backward),
}


def swiglu(gate, up):
    return F.silu(gate) * up


def swiglu_backward(dact, gate, up):
    gate32, dact32 = gate.float(), dact.float()
    sig = torch.sigmoid(gate32)
    dup = dact32 * gate32 * sig
    dgate = dact32 * up.float() * sig * (1 + gate32 * (1 - sig))
    return dgate.to(gate.dtype), dup.to(up.dtype)


def rotary(x, cos, sin):
    """`x * cos + rotate_half(x) * sin`, rotate_half(x1, x2) = (-x2, x1) over the halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rotary_backward(dy, cos, sin):
    # The transpose of x -> rotate_half(x) * sin is z -> (z2, -z1) of z = dy * sin.
    z1, z2 = (dy * sin).chunk(2, dim=-1)
    return dy * cos + torch.cat((z2, -z1), dim=-1)


def scaled(x, scale):
    """x * scale (a float32 scalar tensor) computed in float32, in x's dtype: no float16 rounding of the scale."""
    return (x.float() * scale).to(x.dtype)


_compiled: dict = {}


def compiled(fn, like: torch.Tensor):
    """`fn` compiled for CUDA tensors (once per function), `fn` itself elsewhere."""
    if not like.is_cuda:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True)
    return _compiled[fn]
