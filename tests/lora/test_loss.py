"""The chunked linear + cross-entropy is transformers' causal-LM loss, and trains in float16 as PEFT's does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from internvl.lora.loss import linear_cross_entropy

TIGHT = dict(rtol=1e-5, atol=1e-6)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_loss(hidden, head, labels, num_items=None):
    targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    logits = (hidden @ head.t()).float()
    reduction = "mean" if num_items is None else "sum"
    loss = nn.functional.cross_entropy(logits.reshape(-1, head.shape[0]), targets.reshape(-1), reduction=reduction)
    return loss if num_items is None else loss / num_items


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [50, 48])  # 50: the head is split into 48 aligned rows and a tail of 2
@pytest.mark.parametrize("num_items", [None, 9])
def test_chunked_linear_cross_entropy_matches_full_logits(num_items, vocab, device):
    hidden = torch.randn(2, 10, 16, device=device, requires_grad=True)
    head = torch.randn(vocab, 16, device=device)
    labels = torch.randint(vocab, (2, 10), device=device)
    labels[1, :4] = -100
    labels[0, 3] = vocab - 1  # a target in the tail
    ref = reference_loss(hidden, head, labels, num_items)
    (ref_grad,) = torch.autograd.grad(ref, hidden)

    # 150 logits per chunk: 3 rows at a time, so several chunks and a ragged last one.
    loss = linear_cross_entropy(hidden, head, labels, num_items, chunk_elements=150)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, ref, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)


@pytest.mark.parametrize("scale", [65536.0, 1024.0])  # the GradScaler's first scale, and a smaller one
def test_in_fp16_the_scaled_loss_gradient_is_finite_and_as_close_to_fp32_as_peft(scale):
    """float16 hidden states, `(loss * scale).backward()` as a GradScaler runs it: the gradient of the hidden state
    (divided by the scale) is within float16's noise of float32's, as PEFT's float32 loss of float16 logits is."""
    torch.manual_seed(0)
    hidden32 = torch.randn(8, 256, 32)  # enough tokens and words that a 1/tokens * softmax underflows float16
    head32 = torch.randn(8000, 32) * 0.2
    labels = torch.randint(8000, (8, 256))
    labels[:, :20] = -100
    (grad32,) = torch.autograd.grad(reference_loss(hidden32.requires_grad_(), head32, labels), hidden32)

    hidden, head = hidden32.detach().half().requires_grad_(), head32.half()
    (peft,) = torch.autograd.grad(reference_loss(hidden, head, labels) * scale, hidden)
    (fused,) = torch.autograd.grad(linear_cross_entropy(hidden, head, labels, chunk_elements=2**18) * scale, hidden)
    assert torch.isfinite(fused).all()

    def error(grad):
        return ((grad.float() / scale - grad32).norm() / grad32.norm()).item()

    assert error(fused) < 2 * error(peft) + 1e-4
