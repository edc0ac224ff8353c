"""Triton kernels of the fused LoRA path; CUDA only (`internvl.lora.products` picks them or torch's ops).

Dropout's keep-mask comes from a counter-based generator (Philox), so a seed is all backward needs to apply the
same mask again: no mask is stored. Element i of a contiguous tensor is kept when number `i % 4` of
`tl.rand4x(seed, i // 4)` is at least p (one Philox call per four elements: one per element made a pass
4x slower than memory allows). The mask is drawn inside the kernels that use it, so the three products of a
LoRA adapter with dropout each read their [tokens, features] operand once:

- `lora_a_product`: h = drop(x) A^T (forward);
- `lora_a_grad`: dA = dh^T drop(x) (backward);
- `add_lora_input_grad`: out = base + drop(dh A) (backward; the input gradient of the adapter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from internvl.lora.products import kernels_take as supports  # the one rule of which inputs these kernels take


@triton.jit
def _uniform(seed, rows, col_start, row_stride, BM: tl.constexpr, BK: tl.constexpr):
    """Uniform numbers for the [BM, BK] tile at (rows, col_start ...) of a contiguous matrix of `row_stride`
    columns; `col_start` and `row_stride` are multiples of 4, so each group of four lies in one row."""
    groups = (rows[:, None] * row_stride + col_start) // 4 + tl.arange(0, BK // 4)[None, :]  # [BM, BK / 4]
    u0, u1, u2, u3 = tl.rand4x(seed, groups.to(tl.uint32))
    u = tl.join(tl.join(u0, u1), tl.join(u2, u3))  # [BM, BK / 4, 2, 2]: lane 2 j + l of each group
    return tl.reshape(u, (BM, BK))


@triton.jit
def _apply_keep_mask_kernel(x_ptr, out_ptr, n, seed, p, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * (BLOCK // 128) + tl.arange(0, BLOCK // 128)  # the tensor as rows of 128
    offsets = rows[:, None] * 128 + tl.arange(0, 128)[None, :]
    valid = offsets < n
    x = tl.load(x_ptr + offsets, mask=valid)
    keep = _uniform(seed, rows, 0, 128, BLOCK // 128, 128) >= p
    tl.store(out_ptr + offsets, tl.where(keep, x, 0.0).to(x.dtype), mask=valid)


def apply_keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """`x` with the elements that dropout (rate p, `seed`) drops set to zero; no 1/(1-p) scaling.

    Element i's fate depends only on (seed, i), so equal seeds give equal masks.
    """
    if not x.is_contiguous() or x.numel() >= 2**31:
        raise ValueError("apply_keep_mask needs a contiguous tensor of fewer than 2**31 elements")
    out = torch.empty_like(x)
    block = 4096
    _apply_keep_mask_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), seed, p, BLOCK=block)
    return out


@triton.jit
def _lora_a_product_kernel(x_ptr, a_ptr, h_ptr, n_rows, k, r, seed, p,
                           BM: tl.constexpr, BK: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, R)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for start in range(0, k, BK):
        cols = start + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * k + cols[None, :], mask=(rows[:, None] < n_rows) & (cols[None, :] < k),
                    other=0.0)
        x = tl.where(_uniform(seed, rows, start, k, BM, BK) >= p, x, 0.0).to(x.dtype)
        a = tl.load(a_ptr + ranks[None, :] * k + cols[:, None], mask=(ranks[None, :] < r) & (cols[:, None] < k),
                    other=0.0)  # [BK, R]: A^T
        acc = tl.dot(x, a, acc)
    tl.store(h_ptr + rows[:, None] * r + ranks[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < r))


def lora_a_product(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """drop(x) @ lora_a^T for x [N, K] and lora_a [r, K] (both x's dtype); no 1/(1-p) scaling."""
    _check(x)
    n_rows, k = x.shape
    r = lora_a.shape[0]
    h = torch.empty(n_rows, r, dtype=x.dtype, device=x.device)
    block_m = 32  # small row blocks: 128 programs for 4,096 tokens, so every SM streams its share of x
    _lora_a_product_kernel[(triton.cdiv(n_rows, block_m),)](
        x, lora_a.contiguous(), h, n_rows, k, r, seed, p, BM=block_m, BK=128, R=_rank_block(r),
        num_warps=4, num_stages=3,
    )
    return h


@triton.jit
def _lora_a_grad_kernel(dh_ptr, x_ptr, grad_ptr, n_rows, k, r, rows_per_program, seed, p,
                        BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    first_row = tl.program_id(1) * rows_per_program
    for start in range(first_row, first_row + rows_per_program, BN):
        rows = start + tl.arange(0, BN)
        in_rows = (rows < n_rows) & (rows < first_row + rows_per_program)
        x = tl.load(x_ptr + rows[:, None] * k + cols[None, :], mask=in_rows[:, None] & (cols[None, :] < k),
                    other=0.0)
        x = tl.where(_uniform(seed, rows, tl.program_id(0) * BK, k, BN, BK) >= p, x, 0.0).to(x.dtype)
        dh = tl.load(dh_ptr + rows[None, :] * r + ranks[:, None], mask=in_rows[None, :] & (ranks[:, None] < r),
                     other=0.0)  # [R, BN]: dh^T
        acc = tl.dot(dh, x, acc)
    tl.atomic_add(grad_ptr + ranks[:, None] * k + cols[None, :], acc, mask=(ranks[:, None] < r) & (cols[None, :] < k))


def lora_a_grad(dh: torch.Tensor, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dh^T @ drop(x) in float32, for dh [N, r] and x [N, K] (same dtype); no 1/(1-p) scaling.

    Row blocks add their partial sums atomically, in no fixed order: two runs may differ in the last bits.
    """
    _check(x)
    n_rows, k = x.shape
    r = dh.shape[1]
    grad = torch.zeros(r, k, dtype=torch.float32, device=x.device)
    block_k, block_n = 128, 64
    splits = max(1, min(triton.cdiv(n_rows, block_n), 256 // triton.cdiv(k, block_k)))  # ~256 programs
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, splits), block_n) * block_n
    _lora_a_grad_kernel[(triton.cdiv(k, block_k), triton.cdiv(n_rows, rows_per_program))](
        dh.contiguous(), x, grad, n_rows, k, r, rows_per_program, seed, p, BN=block_n, BK=block_k,
        R=_rank_block(r), num_warps=4, num_stages=3,
    )
    return grad


@triton.jit
def _add_lora_input_grad_kernel(dh_ptr, a_ptr, base_ptr, out_ptr, n_rows, k, r, seed, p,
                                BM: tl.constexpr, BK: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, R)
    dh = tl.load(dh_ptr + rows[:, None] * r + ranks[None, :], mask=(rows[:, None] < n_rows) & (ranks[None, :] < r),
                 other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * k + cols[None, :], mask=(ranks[:, None] < r) & (cols[None, :] < k),
                other=0.0)
    lora = tl.dot(dh, a)  # [BM, BK] float32
    inside = (rows[:, None] < n_rows) & (cols[None, :] < k)
    offsets = rows[:, None] * k + cols[None, :]
    base = tl.load(base_ptr + offsets, mask=inside, other=0.0)
    lora = tl.where(_uniform(seed, rows, tl.program_id(1) * BK, k, BM, BK) >= p, lora.to(base.dtype), 0.0)
    tl.store(out_ptr + offsets, (base + lora).to(base.dtype), mask=inside)


def add_lora_input_grad(dh: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int, base: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """base + drop(dh @ lora_a) for dh [N, r], lora_a [r, K], base [N, K] (one dtype); `out` may be `base`."""
    _check(base)
    n_rows, k = base.shape
    out = torch.empty_like(base) if out is None else out
    block_m, block_k = 64, 128
    _add_lora_input_grad_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(k, block_k))](
        dh.contiguous(), lora_a.contiguous(), base, out, n_rows, k, dh.shape[1], seed, p, BM=block_m, BK=block_k,
        R=_rank_block(dh.shape[1]), num_warps=4,
    )
    return out


def _check(x: torch.Tensor) -> None:
    if not supports(x):
        raise ValueError("the LoRA dropout kernels need a contiguous bfloat16 or float16 CUDA matrix of fewer than "
                         f"2**31 elements whose rows are a multiple of 4 long, got {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}")


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs at least 16 along each side
