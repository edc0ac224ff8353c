"""The LoRA adapter's products with dropout, on the Triton kernels where they take the input, in torch elsewhere.

Dropout's keep-mask is never stored: it is drawn again from a seed wherever it is applied. Which generator draws
it depends only on the tensor's device and size, never on its layout, so the three products of one adapter (on
tensors of one [tokens, features] shape) always apply the same mask, whichever of them runs in Triton:
- on CUDA, below 2**31 elements: counter-based Philox by element index (`internvl.lora.kernels`), drawn inside the
  products when `kernels_take` the operand (contiguous 16-bit rows of whole groups of four), else by one Triton
  pass over a contiguous copy;
- elsewhere (the CPU; larger CUDA tensors): torch's generator seeded with the seed, over a contiguous mask.
"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MAX_KERNEL_ELEMENTS = 2**31  # the kernels index with 32-bit integers


def _philox(x: torch.Tensor) -> bool:
    """Whether x's mask comes from the Triton kernels' Philox (else from torch's generator)."""
    return x.is_cuda and x.numel() < MAX_KERNEL_ELEMENTS


def kernel_layout(x: torch.Tensor) -> bool:
    """Whether `x`'s dtype, size and layout suit the kernels' products: a contiguous matrix of bfloat16 or float16
    (float32 training keeps torch's exact float32 products), below 2**31 elements, rows of whole groups of four."""
    return (x.dtype in KERNEL_DTYPES and x.dim() == 2 and x.is_contiguous() and x.numel() < MAX_KERNEL_ELEMENTS
            and x.shape[-1] % 4 == 0)


def kernels_take(x: torch.Tensor) -> bool:
    """Whether `internvl.lora.kernels`' products take `x`: a CUDA tensor of `kernel_layout`."""
    return x.is_cuda and kernel_layout(x)


def dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """`x` times the 0/1 keep-mask (keep probability 1 - p) of `seed`; no 1/(1-p) scaling."""
    if _philox(x):  # one Triton pass, the mask drawn in-register
        from internvl.lora.kernels import apply_keep_mask  # imports triton: CUDA only

        return apply_keep_mask(x.contiguous(), p, seed)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return x * torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p, generator=generator)


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The 0/1 keep-mask that the fused functions apply for dropout rate `p` and `seed`, shaped like `like`."""
    return dropped(torch.ones(like.shape, dtype=like.dtype, device=like.device), p, seed)


def _kernels_for(x: torch.Tensor, p: float):
    """`internvl.lora.kernels` when dropout is on and its dropout-fused products take x, else None."""
    if p == 0.0 or not kernels_take(x):
        return None
    from internvl.lora import kernels  # imports triton: CUDA only

    return kernels


def lora_a_product(x2, lora_a, p: float, seed: int):
    """drop(x2) A^T (no 1/(1-p)) for x2 [N, in], in x2's dtype."""
    lora_a = lora_a.to(x2.dtype)
    if kernels := _kernels_for(x2, p):
        return kernels.lora_a_product(x2, lora_a, p, seed)
    return (x2 if p == 0.0 else dropped(x2, p, seed)) @ lora_a.t()


def lora_a_grad(dh, x2, p: float, seed: int):
    """dh^T drop(x2) (no 1/(1-p)): the gradient of A, [r, in], in dh's dtype or float32."""
    if dh.dtype == x2.dtype and (kernels := _kernels_for(x2, p)):
        return kernels.lora_a_grad(dh, x2, p, seed)
    return dh.t() @ (x2 if p == 0.0 else dropped(x2, p, seed)).to(dh.dtype)


def add_lora_input_grad_(dh, lora_a, p: float, seed: int, base) -> None:
    """base += drop(dh A) (no 1/(1-p)): the adapter's share of the input gradient, added in place.

    The mask is drawn on a tensor of base's dtype, as the forward's was on the input's."""
    lora_a = lora_a.to(dh.dtype)
    if dh.dtype != base.dtype or p > 0.0 and not kernels_take(base):
        update = (dh @ lora_a).to(base.dtype)
        base.add_(update if p == 0.0 else dropped(update, p, seed))
    elif p == 0.0:
        base.addmm_(dh, lora_a)
    else:
        from internvl.lora import kernels  # imports triton: CUDA only

        kernels.add_lora_input_grad(dh, lora_a, p, seed, base, out=base)
