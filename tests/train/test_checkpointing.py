"""The activation-checkpointing policy: which decoder layers keep, recompute their MLP, or recompute everything."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from internvl.archs import llm_arch
from internvl.lora.fast import enable_fast_lora
from internvl.lora.fused_modules import FusedGatedMLP
from internvl.train.checkpointing import (
    CheckpointPlan,
    checkpointable_layers,
    fit_checkpointing,
    set_checkpointed_layers,
)
from tests.builders import lora_grads, tiny_peft_llm, token_batch

TIGHT = dict(rtol=1e-5, atol=1e-6)
LAYERS = 2  # the tiny LLMs'


@pytest.mark.parametrize("plan", [CheckpointPlan(keep=1), CheckpointPlan(recompute_mlp=1),
                                  CheckpointPlan(keep=1, recompute_mlp=1), CheckpointPlan(recompute_mlp=2)])
def test_every_checkpoint_plan_gives_the_same_gradients_with_dropout(plan):
    input_ids, labels = token_batch()
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton dropout kernels run on CUDA only")
def test_on_cuda_in_bf16_a_recomputed_layer_redraws_the_triton_dropout_masks():
    input_ids, labels = (t.cuda() for t in token_batch(length=64))
    grads = []
    for plan in (None, CheckpointPlan(), CheckpointPlan(recompute_mlp=2)):
        model = tiny_peft_llm("Qwen2ForCausalLM", dropout=0.3).cuda()
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.data = param.data.bfloat16()
        with enable_fast_lora(model):
            if plan is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                set_checkpointed_layers(model, plan)
            torch.manual_seed(3)
            model(input_ids=input_ids, labels=labels).loss.backward()
        grads.append(lora_grads(model))
    for other in grads[1:]:  # another mask would move a gradient by its whole size; atomics and bf16 by far less
        for name, grad in other.items():
            torch.testing.assert_close(grad, grads[0][name], rtol=2e-2, atol=1e-3, msg=name)


def counting_linear(monkeypatch, names: dict[int, str]) -> list:
    """Record the name (from `names`, by weight) of every nn.functional.linear call."""
    calls = []
    linear = nn.functional.linear

    def counted(x, weight, bias=None):
        calls.append(names.get(id(weight)))
        return linear(x, weight, bias)

    monkeypatch.setattr(nn.functional, "linear", counted)
    return calls


def test_mlp_recompute_runs_gate_and_up_again_and_checkpointing_runs_the_whole_layer(monkeypatch):
    model = tiny_peft_llm("Qwen2ForCausalLM")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = {id(m.base_layer.weight): n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "base_layer")}
    calls = counting_linear(monkeypatch, names)
    runs = {}
    with enable_fast_lora(model):
        for plan in (CheckpointPlan(keep=2), CheckpointPlan(recompute_mlp=2), CheckpointPlan()):
            set_checkpointed_layers(model, plan)
            calls.clear()
            model(input_ids=token_batch()[0], labels=token_batch()[1]).loss.backward()
            runs[plan] = {name: calls.count(name) for name in set(calls) - {None}}
    assert set(runs[CheckpointPlan(keep=2)].values()) == {LAYERS}  # each projection once per layer
    assert runs[CheckpointPlan(recompute_mlp=2)] == {**runs[CheckpointPlan(keep=2)], "gate_proj": 2 * LAYERS,
                                                     "up_proj": 2 * LAYERS}
    assert runs[CheckpointPlan()] == {name: LAYERS if name == "down_proj" else 2 * LAYERS
                                      for name in runs[CheckpointPlan(keep=2)]}


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "InternLM2ForCausalLM"])
def test_checkpointed_layers_do_not_recompute_the_down_projection(arch, monkeypatch):
    model = tiny_peft_llm(arch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    down = llm_arch(arch).gated_mlp[2].rpartition(".")[2]
    names = {id(m.base_layer.weight): n.endswith(down) for n, m in model.named_modules() if hasattr(m, "base_layer")}
    calls = counting_linear(monkeypatch, names)
    with enable_fast_lora(model):
        loss = model(input_ids=token_batch()[0], labels=token_batch()[1]).loss
        forward_calls = sum(bool(c) for c in calls)
        loss.backward()
    assert forward_calls == LAYERS
    assert sum(bool(c) for c in calls) == LAYERS  # the recompute stopped after the last saved tensor, before it
    # while every other projection ran twice (forward and recompute)
    assert sum(c is not None for c in calls) == (2 * len(llm_arch(arch).lora_targets) - 1) * LAYERS


def test_the_plan_is_a_field_of_the_fused_gated_mlps_and_needs_checkpointing_enabled():
    model = tiny_peft_llm("Qwen2ForCausalLM")
    with pytest.raises(ValueError, match="enable gradient checkpointing first"):
        set_checkpointed_layers(model, CheckpointPlan())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with enable_fast_lora(model):
        set_checkpointed_layers(model, CheckpointPlan(keep=1, recompute_mlp=1))
        layers = checkpointable_layers(model)
        mlps = [m for m in model.modules() if isinstance(m, FusedGatedMLP)]
        assert [layer.gradient_checkpointing for layer in layers] == [False, False]
        assert [mlp.recompute_gate_up for mlp in mlps] == [True, False]
    assert not any(isinstance(m, FusedGatedMLP) for m in model.modules())


def test_fit_checkpointing_fills_the_budget_with_the_cheapest_recompute_first(monkeypatch):
    """fit_checkpointing's choices, on measured peaks that a stand-in for the CUDA allocator reports."""
    layers = 6
    model = tiny_peft_llm("Qwen2ForCausalLM")
    for _ in range(layers - LAYERS):
        model.get_base_model().model.layers.append(copy.deepcopy(model.get_base_model().model.layers[-1]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    handle = enable_fast_lora(model)
    layer_list = model.get_base_model().model.layers

    # a checkpointed layer holds 1 unit, an MLP-recomputed one 4, a kept one 10, on top of 100 units of weights
    def memory():
        flags = [(layer.gradient_checkpointing, layer.mlp.recompute_gate_up) for layer in layer_list]
        return 100 + sum(1 if ckpt else 4 if recompute else 10 for ckpt, recompute in flags)

    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", memory)
    assert fit_checkpointing(model, lambda: None, budget_bytes=100 + 6 * 4) == CheckpointPlan(0, 6)
    assert fit_checkpointing(model, lambda: None, budget_bytes=100 + 6 + 3 * 3) == CheckpointPlan(0, 3)
    assert fit_checkpointing(model, lambda: None, budget_bytes=100 + 4 * 4 + 2 * 10) == CheckpointPlan(2, 4)
    assert fit_checkpointing(model, lambda: None, budget_bytes=10**9) == CheckpointPlan(6, 0)
    assert [layer.gradient_checkpointing for layer in layer_list] == [False] * 6
    handle.restore()
