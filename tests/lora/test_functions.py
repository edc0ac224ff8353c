"""The fused autograd functions compute what PEFT's layers and transformers' modules compute, forward and backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from internvl.lora.functions import (
    GatedLoraA,
    LinearLora,
    LinearLoraB,
    Norm,
    Projection,
    RMSNormFunction,
    RotaryFunction,
    apply_rotary_pos_emb,
)
from internvl.lora.products import dropout_mask
from tests.builders import lora_grads, randomize_lora

TIGHT = dict(rtol=1e-5, atol=1e-6)
# The fused functions also run on CUDA (Triton dropout); where a GPU is present they are checked there too.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NORMS = {"llama": Qwen2RMSNorm, "gpt_oss": GptOssRMSNorm}


class FixedMask(nn.Module):
    """PEFT's dropout replaced by a given keep-mask (inverted-dropout scaling), to replay the fused path's draw."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.view_as(x) / (1 - self.p)


def frozen_norm(formula: str, width: int, dtype=torch.float64, device="cpu") -> nn.Module:
    norm = NORMS[formula](width, eps=1e-6)
    norm.weight.data = torch.randn(width) * 0.5 + 1
    return norm.requires_grad_(False).to(device, dtype)


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_matches_peft_with_the_same_dropout_mask(device, bias, with_norm):
    torch.manual_seed(0)
    peft = get_peft_model(nn.Sequential(nn.Linear(16, 24, bias=bias)),
                          LoraConfig(r=4, lora_alpha=12, lora_dropout=0.3, target_modules=["0"]))
    randomize_lora(peft)
    peft.to(device, torch.float64)  # float64: the two sides sum in different orders
    layer = peft.base_model.model[0]
    norm = frozen_norm("llama", 16, device=device) if with_norm else nn.Identity()
    x = torch.randn(3, 5, 16, device=device, dtype=torch.float64, requires_grad=True)
    layer.lora_dropout["default"] = FixedMask(dropout_mask(x.reshape(-1, 16), 0.3, 11), 0.3)
    weight = torch.randn(3, 5, 24, device=device, dtype=torch.float64)

    ref = layer(norm(x))
    (weight * ref).sum().backward()
    ref_dx, ref_grads = x.grad.clone(), lora_grads(peft)
    x.grad = None
    peft.zero_grad()

    proj = Projection(layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"], 0.3)
    spec = Norm(norm.weight, norm.variance_epsilon, "llama") if with_norm else None
    out = LinearLora.apply(x, proj, 11, spec, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    (weight * out).sum().backward()

    torch.testing.assert_close(out, ref, **TIGHT)
    torch.testing.assert_close(x.grad, ref_dx, **TIGHT)
    for name, grad in lora_grads(peft).items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT)


@pytest.mark.parametrize(("recompute", "with_norm"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("device", DEVICES)
def test_gated_mlp_matches_peft_with_the_same_dropout_masks(device, recompute, with_norm):
    torch.manual_seed(1)
    names = ("gate", "up", "down")
    mlp = nn.ModuleDict({"gate": nn.Linear(16, 24), "up": nn.Linear(16, 24, bias=False),
                         "down": nn.Linear(24, 16, bias=False)})
    peft = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=list(names)))
    randomize_lora(peft)
    peft.to(device)
    layers = [peft.base_model.model[name] for name in names]
    norm = frozen_norm("gpt_oss", 16, torch.float32, device) if with_norm else nn.Identity()
    x = torch.randn(2, 7, 16, device=device, requires_grad=True)
    seeds = (5, 6, 7)
    for layer, seed, width in zip(layers, seeds, (16, 16, 24)):
        layer.lora_dropout["default"] = FixedMask(dropout_mask(torch.empty(14, width, device=device), 0.2, seed), 0.2)
    weight = torch.randn(2, 7, 16, device=device)

    gate, up, down = layers
    n = norm(x)
    (weight * down(nn.functional.silu(gate(n)) * up(n))).sum().backward()
    ref_dx, ref_grads = x.grad.clone(), lora_grads(peft)
    x.grad = None
    peft.zero_grad()

    projections = tuple(Projection(l.base_layer.weight, l.base_layer.bias, l.scaling["default"], 0.2) for l in layers)
    spec = Norm(norm.weight, norm.variance_epsilon, "gpt_oss") if with_norm else None
    lora = [gate.lora_A["default"].weight, gate.lora_B["default"].weight, up.lora_A["default"].weight,
            up.lora_B["default"].weight, down.lora_A["default"].weight]
    act, h = GatedLoraA.apply(x, projections, seeds, recompute, spec, *lora)
    out = LinearLoraB.apply(act, h, projections[2], down.lora_B["default"].weight)
    (weight * out).sum().backward()

    torch.testing.assert_close(x.grad, ref_dx, **TIGHT)
    for name, grad in lora_grads(peft).items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


@pytest.mark.parametrize("formula", sorted(NORMS))
def test_each_rms_norm_formula_is_its_class_bitwise_in_bf16_and_to_the_gradient_in_fp64(formula):
    x = torch.randn(4, 64) * 3
    for dtype in (torch.bfloat16, torch.float64):
        norm = frozen_norm(formula, 64, dtype)
        xd = x.to(dtype).requires_grad_()
        ref = norm(xd)
        dy = torch.randn_like(ref)
        (ref_dx,) = torch.autograd.grad(ref, xd, dy)
        out = RMSNormFunction.apply(xd, Norm(norm.weight, norm.variance_epsilon, formula))
        (dx,) = torch.autograd.grad(out, xd, dy)
        if dtype == torch.bfloat16:
            assert torch.equal(out, ref)
        else:
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(dx, ref_dx)


def test_the_two_formulas_differ_in_bf16_so_each_class_needs_its_own():
    x = torch.randn(64, 256).bfloat16() * 3
    weight = (torch.randn(256) * 0.5 + 1).bfloat16()
    llama, gpt_oss = (RMSNormFunction.apply(x, Norm(weight, 1e-6, formula)) for formula in ("llama", "gpt_oss"))
    assert (llama != gpt_oss).float().mean() > 0.05


def test_rotary_matches_transformers_formula_forward_and_backward():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as reference

    q = torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(2, 6, 8, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    ref = reference(q, k, cos, sin)
    ref_grads = torch.autograd.grad(ref, (q, k), (dq, dk))
    out = apply_rotary_pos_emb(q, k, cos, sin)
    grads = torch.autograd.grad(out, (q, k), (dq, dk))
    for a, b in zip(out + grads, ref + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(RotaryFunction.apply, (q, cos[:, None], sin[:, None]))


def test_in_fp16_the_adapter_gradients_keep_float32_range_under_a_grad_scaler_scale():
    """Summed over 4096 tokens, a GradScaler-scaled gradient passes float16's 65504: PEFT's float32 adapter keeps
    it, and so does the fused node (its float16 products would give inf)."""
    torch.manual_seed(0)
    x = torch.rand(4096, 64).half()  # positive, and A too: the sums over tokens add up
    weight, lora_a, lora_b = torch.randn(64, 64).half() * 0.1, torch.rand(4, 64) * 0.1, torch.randn(64, 4) * 0.1
    dy = torch.full((4096, 64), 8.0).half()  # a scaled gradient, well inside float16's range itself
    lora_a.requires_grad_(), lora_b.requires_grad_()
    out = LinearLora.apply(x, Projection(weight, None, 2.0, 0.0), 0, None, lora_a, lora_b)
    out.backward(dy)
    ref_a, ref_b = (p.detach().clone().requires_grad_() for p in (lora_a, lora_b))
    (((x.float() @ ref_a.t()) @ ref_b.t()) * 2.0).backward(dy.float())
    assert lora_b.grad.abs().max() > 65504
    assert torch.isfinite(lora_b.grad).all() and torch.isfinite(lora_a.grad).all()
    torch.testing.assert_close(lora_a.grad, ref_a.grad, rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(lora_b.grad, ref_b.grad, rtol=2e-3, atol=1e-2)
