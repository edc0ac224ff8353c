"""The fused LoRA path computes what PEFT computes: same outputs, same gradients, same parameters."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from internvl.archs import llm_arch, resolve
from internvl.lora.fused import (
    RECOMPUTE_GATE_UP,
    CheckpointPlan,
    GatedLoraA,
    LinearLora,
    LinearLoraB,
    Projection,
    RMSNormFunction,
    RotaryFunction,
    apply_rotary_pos_emb,
    checkpointable_layers,
    dropout_mask,
    enable_fast_lora,
    fit_checkpointing,
    linear_cross_entropy,
    maybe_enable_fast_lora,
    set_checkpointed_layers,
)

TIGHT = dict(rtol=1e-5, atol=1e-6)
LAYERS = 2
SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, attn_implementation="eager")
# The fused functions also run on CUDA (Triton dropout); where a GPU is present they are checked there too.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ARCHS = {"Qwen2ForCausalLM": {}, "LlamaForCausalLM": {}, "Qwen3ForCausalLM": dict(head_dim=8)}
if importlib.util.find_spec("internvl.model.internlm2") is not None:
    ARCHS["InternLM2ForCausalLM"] = dict(bias=False)


class FixedMask(nn.Module):
    """PEFT's dropout replaced by a given keep-mask (inverted-dropout scaling), to replay the fused path's draw."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.view_as(x) / (1 - self.p)


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """Non-zero LoRA A and B (PEFT starts B at zero, which would hide half of the gradients)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_peft_llm(arch: str, dropout: float = 0.0, seed: int = 0):
    row = llm_arch(arch)
    config = resolve(row.config_class)(**SHAPE, **ARCHS[arch])
    torch.manual_seed(seed)
    llm = resolve(row.model_class)(config)
    model = get_peft_model(
        llm, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(row.lora_targets),
                        task_type="CAUSAL_LM"),
    )
    randomize_lora(model, seed)
    model.enable_input_require_grads()
    return model.train()


def batch(vocab: int = 96, length: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (2, length), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a masked prompt, as in chat data
    return input_ids, labels


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_depends_on_the_seed_alone(device):
    like = torch.empty(256, 512, device=device)
    mask = dropout_mask(like, 0.25, seed=7)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - 0.75) < 0.01
    assert torch.equal(dropout_mask(like, 0.25, seed=7), mask)
    assert not torch.equal(dropout_mask(like, 0.25, seed=8), mask)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_matches_peft_with_the_same_dropout_mask(device, bias):
    torch.manual_seed(0)
    peft = get_peft_model(nn.Sequential(nn.Linear(16, 24, bias=bias)),
                          LoraConfig(r=4, lora_alpha=12, lora_dropout=0.3, target_modules=["0"]))
    randomize_lora(peft)
    peft.to(device, torch.float64)  # float64: the two sides sum in different orders
    layer = peft.base_model.model[0]
    x = torch.randn(3, 5, 16, device=device, dtype=torch.float64, requires_grad=True)
    layer.lora_dropout["default"] = FixedMask(dropout_mask(x.reshape(-1, 16), 0.3, 11), 0.3)
    weight = torch.randn(3, 5, 24, device=device, dtype=torch.float64)

    ref = layer(x)
    (weight * ref).sum().backward()
    ref_dx, ref_grads = x.grad.clone(), lora_grads(peft)
    x.grad = None
    peft.zero_grad()

    proj = Projection(layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"], 0.3)
    out = LinearLora.apply(x, proj, 11, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    (weight * out).sum().backward()

    torch.testing.assert_close(out, ref, **TIGHT)
    torch.testing.assert_close(x.grad, ref_dx, **TIGHT)
    for name, grad in lora_grads(peft).items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_gated_mlp_matches_peft_with_the_same_dropout_masks(device, recompute):
    torch.manual_seed(1)
    names = ("gate", "up", "down")
    mlp = nn.ModuleDict({"gate": nn.Linear(16, 24), "up": nn.Linear(16, 24, bias=False),
                         "down": nn.Linear(24, 16, bias=False)})
    peft = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=list(names)))
    randomize_lora(peft)
    peft.to(device)
    layers = [peft.base_model.model[name] for name in names]
    x = torch.randn(2, 7, 16, device=device, requires_grad=True)
    seeds = (5, 6, 7)
    for layer, seed, width in zip(layers, seeds, (16, 16, 24)):
        layer.lora_dropout["default"] = FixedMask(dropout_mask(torch.empty(14, width, device=device), 0.2, seed), 0.2)
    weight = torch.randn(2, 7, 16, device=device)

    gate, up, down = layers
    (weight * down(nn.functional.silu(gate(x)) * up(x))).sum().backward()
    ref_dx, ref_grads = x.grad.clone(), lora_grads(peft)
    x.grad = None
    peft.zero_grad()

    projections = tuple(Projection(l.base_layer.weight, l.base_layer.bias, l.scaling["default"], 0.2) for l in layers)
    lora = [gate.lora_A["default"].weight, gate.lora_B["default"].weight, up.lora_A["default"].weight,
            up.lora_B["default"].weight, down.lora_A["default"].weight]
    act, h = GatedLoraA.apply(x, projections, seeds, recompute, *lora)
    out = LinearLoraB.apply(act, h, projections[2], down.lora_B["default"].weight)
    (weight * out).sum().backward()

    torch.testing.assert_close(x.grad, ref_dx, **TIGHT)
    for name, grad in lora_grads(peft).items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


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


def test_rms_norm_matches_transformers():
    norm = Qwen2RMSNorm(32, eps=1e-6)
    norm.weight.data = torch.randn(32)
    norm.weight.requires_grad_(False)
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    norm.double()
    ref = norm(x)
    dy = torch.randn_like(ref)
    (ref_dx,) = torch.autograd.grad(ref, x, dy)
    out = RMSNormFunction.apply(x, norm.weight, 1e-6)
    (dx,) = torch.autograd.grad(out, x, dy)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, ref_dx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [50, 48])  # 50: the head is split into 48 aligned rows and a tail of 2
@pytest.mark.parametrize("num_items", [None, 9])
def test_chunked_linear_cross_entropy_matches_full_logits(num_items, vocab, device):
    hidden = torch.randn(2, 10, 16, device=device, requires_grad=True)
    head = torch.randn(vocab, 16, device=device)
    labels = torch.randint(vocab, (2, 10), device=device)
    labels[1, :4] = -100
    labels[0, 3] = vocab - 1  # a target in the tail
    targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    logits = hidden @ head.t()
    reduction = "mean" if num_items is None else "sum"
    ref = nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction=reduction)
    ref = ref if num_items is None else ref / num_items
    (ref_grad,) = torch.autograd.grad(ref, hidden)

    # 150 logits per chunk: 3 rows at a time, so several chunks and a ragged last one.
    loss = linear_cross_entropy(hidden, head, labels, num_items, chunk_elements=150)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, ref, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_whole_llm_loss_and_lora_grads_match_peft(arch):
    model = tiny_peft_llm(arch)
    input_ids, labels = batch()
    ref = model(input_ids=input_ids, labels=labels)
    ref.loss.backward()
    ref_grads = lora_grads(model)
    model.zero_grad()

    with enable_fast_lora(model) as handle:
        assert handle.counts["lora_linears"] == len(llm_arch(arch).lora_targets) * LAYERS
        assert handle.counts["gated_mlps"] == LAYERS
        assert handle.counts["rms_norms"] >= 2 * LAYERS + 1  # Qwen3 adds q_norm and k_norm
        assert handle.counts["fused_loss"] == 1
        assert handle.counts["rotary"] == 1
        out = model(input_ids=input_ids, labels=labels)
        out.loss.backward()
    assert out.logits is None  # the point of the fused loss
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


def test_restore_puts_peft_back_and_adapter_format_is_unchanged(tmp_path):
    model = tiny_peft_llm("Qwen2ForCausalLM")
    input_ids, labels = batch()
    keys = set(model.state_dict())
    handle = enable_fast_lora(model)
    assert any("forward" in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="already swapped"):
        enable_fast_lora(model)
    handle.restore()
    assert all("forward" not in vars(m) for m in model.modules())
    assert set(model.state_dict()) == keys
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_two_models_share_the_rotary_swap_until_both_restore():
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    own = qwen2.apply_rotary_pos_emb
    assert own is not apply_rotary_pos_emb
    first = enable_fast_lora(tiny_peft_llm("Qwen2ForCausalLM"))
    second = enable_fast_lora(tiny_peft_llm("Qwen2ForCausalLM"))
    assert first.counts["rotary"] == second.counts["rotary"] == 1
    first.restore()
    assert qwen2.apply_rotary_pos_emb is apply_rotary_pos_emb  # the second model still runs on it
    second.restore()
    assert qwen2.apply_rotary_pos_emb is own


@pytest.mark.parametrize("plan", [CheckpointPlan(keep=1), CheckpointPlan(recompute_mlp=1),
                                  CheckpointPlan(keep=1, recompute_mlp=1), CheckpointPlan(recompute_mlp=2)])
def test_every_checkpoint_plan_gives_the_same_gradients_with_dropout(plan):
    input_ids, labels = batch()
    grads = []
    for checkpointed in (False, True):
        model = tiny_peft_llm("Qwen2ForCausalLM", dropout=0.3)
        with enable_fast_lora(model):
            if checkpointed:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                set_checkpointed_layers(model, plan)
            torch.manual_seed(3)
            model(input_ids=input_ids, labels=labels).loss.backward()
        grads.append(lora_grads(model))
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], **TIGHT, msg=name)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_mlp_recompute_runs_gate_and_up_again_and_checkpointing_runs_the_whole_layer(monkeypatch):
    model = tiny_peft_llm("Qwen2ForCausalLM")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = {id(m.base_layer.weight): n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "base_layer")}
    calls = []
    linear = nn.functional.linear

    def counting_linear(x, weight, bias=None):
        calls.append(names.get(id(weight)))
        return linear(x, weight, bias)

    monkeypatch.setattr(nn.functional, "linear", counting_linear)
    runs = {}
    with enable_fast_lora(model):
        for plan in (CheckpointPlan(keep=2), CheckpointPlan(recompute_mlp=2), CheckpointPlan()):
            set_checkpointed_layers(model, plan)
            calls.clear()
            model(input_ids=batch()[0], labels=batch()[1]).loss.backward()
            runs[plan] = {name: calls.count(name) for name in set(calls) - {None}}
    assert set(runs[CheckpointPlan(keep=2)].values()) == {LAYERS}  # each projection once per layer
    assert runs[CheckpointPlan(recompute_mlp=2)] == {**runs[CheckpointPlan(keep=2)], "gate_proj": 2 * LAYERS,
                                                     "up_proj": 2 * LAYERS}
    assert runs[CheckpointPlan()] == {name: LAYERS if name == "down_proj" else 2 * LAYERS
                                      for name in runs[CheckpointPlan(keep=2)]}


def test_fit_checkpointing_fills_the_budget_with_the_cheapest_recompute_first(monkeypatch):
    """fit_checkpointing's choices, on measured peaks that a stand-in for the CUDA allocator reports."""
    layers = 6
    model = tiny_peft_llm("Qwen2ForCausalLM")
    for _ in range(layers - LAYERS):
        model.get_base_model().model.layers.append(copy.deepcopy(model.get_base_model().model.layers[-1]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # a checkpointed layer holds 1 unit, an MLP-recomputed one 4, a kept one 10, on top of 100 units of weights
    def memory(plan_layers):
        flags = [(l.gradient_checkpointing, getattr(l.mlp, RECOMPUTE_GATE_UP)) for l in plan_layers]
        return 100 + sum(1 if ckpt else 4 if recompute else 10 for ckpt, recompute in flags)

    layer_list = model.get_base_model().model.layers
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: memory(layer_list))
    assert fit_checkpointing(model, lambda: None, budget_bytes=100 + 6 * 4) == CheckpointPlan(0, 6)
    assert fit_checkpointing(model, lambda: None, budget_bytes=100 + 6 + 3 * 3) == CheckpointPlan(0, 3)
    assert fit_checkpointing(model, lambda: None, budget_bytes=100 + 4 * 4 + 2 * 10) == CheckpointPlan(2, 4)
    assert fit_checkpointing(model, lambda: None, budget_bytes=10**9) == CheckpointPlan(6, 0)
    assert [l.gradient_checkpointing for l in layer_list] == [False] * 6


def test_unsupported_configurations_are_refused_with_the_reason():
    model = tiny_peft_llm("Qwen2ForCausalLM")
    llm = model.get_base_model()
    with pytest.raises(ValueError, match="not a PeftModel"):
        enable_fast_lora(llm)
    dora = get_peft_model(model.unload(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        enable_fast_lora(dora)
    assert maybe_enable_fast_lora(dora) is None  # CPU, and DoRA: PEFT's own path with a logged reason


@pytest.mark.parametrize("arch", sorted(set(ARCHS) & {"Qwen2ForCausalLM", "InternLM2ForCausalLM"}))
def test_checkpointed_layers_do_not_recompute_the_down_projection(arch, monkeypatch):
    model = tiny_peft_llm(arch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    down_weights = {id(m.base_layer.weight) for n, m in model.named_modules() if n.endswith(("down_proj", "w2"))}
    calls = []
    linear = nn.functional.linear

    def counting_linear(x, weight, bias=None):
        calls.append(id(weight) in down_weights)
        return linear(x, weight, bias)

    monkeypatch.setattr(nn.functional, "linear", counting_linear)
    with enable_fast_lora(model):
        loss = model(input_ids=batch()[0], labels=batch()[1]).loss
        forward_calls = sum(calls)
        loss.backward()
    assert forward_calls == LAYERS
    assert sum(calls) == LAYERS  # the recompute stopped after the last saved tensor, before the down GEMM
    # while every other projection ran twice (forward and recompute)
    assert len(calls) == (2 * len(llm_arch(arch).lora_targets) - 1) * LAYERS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
@pytest.mark.parametrize("rank", [4, 20])
def test_dropout_kernels_apply_the_mask_of_dropout_mask(rank):
    from internvl.lora import kernels

    generator = torch.Generator(device="cuda").manual_seed(0)
    # bf16, as in training (the fused path keeps torch's products for float32); ragged against every block size
    x, lora_a, dh, base = (torch.randn(*shape, device="cuda", generator=generator).bfloat16()
                           for shape in ((300, 260), (rank, 260), (300, rank), (300, 260)))
    mask = dropout_mask(x, 0.3, seed=9)
    assert abs(mask.float().mean().item() - 0.7) < 0.01
    assert torch.equal(kernels.apply_keep_mask(x, 0.3, 9), x * mask)
    x32, a32, dh32, mask32 = x.float(), lora_a.float(), dh.float(), mask.float()
    loose = dict(rtol=2e-2, atol=5e-2)  # bf16 rounding of the outputs
    torch.testing.assert_close(kernels.lora_a_product(x, lora_a, 0.3, 9).float(), (x32 * mask32) @ a32.t(), **loose)
    torch.testing.assert_close(kernels.lora_a_grad(dh, x, 0.3, 9), dh32.t() @ (x32 * mask32), **loose)
    torch.testing.assert_close(kernels.add_lora_input_grad(dh, lora_a, 0.3, 9, base).float(),
                               base.float() + (dh32 @ a32) * mask32, **loose)


@pytest.mark.parametrize("arch", ["InternLM2ForCausalLM", "Qwen2ForCausalLM"])
def test_whole_internvl_step_on_the_fused_path_gets_peft_gradients(arch, tokenizer):
    """What `finetune` does on CUDA, on the CPU: the official LoRA recipe's model, an image sample, MLP recompute."""
    from tests.builders import build_batch, build_model

    model = build_model(arch).train()
    model.requires_grad_(False)
    model.wrap_llm_lora(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, verbose=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = build_batch(model, tokenizer)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = lora_grads(model)
    model.zero_grad()

    llm = model.language_model
    with enable_fast_lora(llm):
        set_checkpointed_layers(llm, CheckpointPlan(recompute_mlp=len(checkpointable_layers(llm))))
        loss = model(**batch).loss
        loss.backward()
    torch.testing.assert_close(loss, ref, **TIGHT)
    assert ref_grads
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)
