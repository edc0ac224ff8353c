"""The LoRA products with dropout: the mask depends on the seed alone, and the kernels take only what they can."""

from __future__ import annotations

import pytest
import torch

from internvl.lora.products import (
    add_lora_input_grad_,
    dropout_mask,
    kernel_layout,
    kernels_take,
    lora_a_grad,
    lora_a_product,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_depends_on_the_seed_alone(device):
    like = torch.empty(256, 512, device=device)
    mask = dropout_mask(like, 0.25, seed=7)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - 0.75) < 0.01
    assert torch.equal(dropout_mask(like, 0.25, seed=7), mask)
    assert not torch.equal(dropout_mask(like, 0.25, seed=8), mask)
    # by element index, whatever the layout of the tensor it is shaped like
    assert torch.equal(dropout_mask(torch.empty(512, 256, device=device).t(), 0.25, 7), mask)


def test_the_kernels_take_contiguous_16_bit_matrices_below_2_to_the_31_elements_only():
    def meta(*shape, dtype=torch.bfloat16):  # shapes and layouts without memory
        return torch.empty(*shape, dtype=dtype, device="meta")

    assert kernel_layout(meta(64, 64)) and kernel_layout(meta(64, 64, dtype=torch.float16))
    assert not kernel_layout(meta(64, 64, dtype=torch.float32))  # float32 keeps torch's exact products
    assert not kernel_layout(meta(64, 64).t())  # not contiguous
    assert not kernel_layout(meta(64, 62))  # rows not whole groups of four
    assert not kernel_layout(meta(2**16, 2**15))  # 2**31 elements: beyond the kernels' 32-bit indices
    assert kernel_layout(meta(2**16, 2**15 - 4))
    assert not kernels_take(torch.empty(64, 64, dtype=torch.bfloat16))  # on the CPU, torch's ops


@pytest.mark.parametrize("device", DEVICES)
def test_products_on_an_input_the_kernels_do_not_take_apply_the_same_mask(device):
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    x = torch.randn(260, 300, device=device, generator=generator).to(dtype).t()  # [300, 260], not contiguous
    lora_a = torch.randn(8, 260, device=device, generator=generator).to(dtype)
    dh = torch.randn(300, 8, device=device, generator=generator).to(dtype)
    assert not kernels_take(x)
    mask = dropout_mask(x, 0.3, 9)
    loose = dict(rtol=2e-2, atol=5e-2) if device == "cuda" else {}
    torch.testing.assert_close(lora_a_product(x, lora_a, 0.3, 9), (x * mask) @ lora_a.t(), **loose)
    torch.testing.assert_close(lora_a_grad(dh, x, 0.3, 9).to(dtype), dh.t() @ (x * mask), **loose)
    base = torch.zeros(260, 300, device=device, dtype=dtype).t()
    add_lora_input_grad_(dh, lora_a, 0.3, 9, base)
    torch.testing.assert_close(base, (dh @ lora_a) * mask, **loose)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
@pytest.mark.parametrize("rank", [4, 20])
def test_dropout_kernels_apply_the_mask_of_dropout_mask(rank):
    from internvl.lora import kernels

    generator = torch.Generator(device="cuda").manual_seed(0)
    # bf16, as in training (the fused path keeps torch's products for float32); ragged against every block size
    x, lora_a, dh, base = (torch.randn(*shape, device="cuda", generator=generator).bfloat16()
                           for shape in ((300, 260), (rank, 260), (300, rank), (300, 260)))
    assert kernels_take(x)
    mask = dropout_mask(x, 0.3, seed=9)
    assert abs(mask.float().mean().item() - 0.7) < 0.01
    assert torch.equal(kernels.apply_keep_mask(x, 0.3, 9), x * mask)
    x32, a32, dh32, mask32 = x.float(), lora_a.float(), dh.float(), mask.float()
    loose = dict(rtol=2e-2, atol=5e-2)  # bf16 rounding of the outputs
    torch.testing.assert_close(kernels.lora_a_product(x, lora_a, 0.3, 9).float(), (x32 * mask32) @ a32.t(), **loose)
    torch.testing.assert_close(kernels.lora_a_grad(dh, x, 0.3, 9), dh32.t() @ (x32 * mask32), **loose)
    torch.testing.assert_close(kernels.add_lora_input_grad(dh, lora_a, 0.3, 9, base).float(),
                               base.float() + (dh32 @ a32) * mask32, **loose)
