"""The arch table's facts for the fused training path hold for every architecture's real classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from internvl.archs import LLM_ARCHS, resolve
from internvl.lora.functions import Norm, RMSNormFunction
from internvl.tiny import tiny_config

ARCHS = sorted(LLM_ARCHS)


def tiny_llm(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return resolve(LLM_ARCHS[arch].model_class)(tiny_config(arch).llm_config).eval()


def first_layer(arch: str):
    llm = tiny_llm(arch)
    layers = llm.get_submodule(LLM_ARCHS[arch].decoder_layers)
    assert len(layers) == llm.config.num_hidden_layers
    return llm, layers[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_rms_norm_class_and_formula_are_the_architectures(arch):
    row = LLM_ARCHS[arch]
    llm, layer = first_layer(arch)
    norm_class = resolve(row.rms_norm_class)
    assert all(type(layer.get_submodule(norm)) is norm_class for norm, _ in row.norm_readers)
    norm = next(m for m in llm.modules() if type(m) is norm_class).bfloat16()
    norm.weight.data = torch.randn(norm.weight.shape).bfloat16() * 0.5 + 1
    x = torch.randn(8, norm.weight.shape[0]).bfloat16() * 3
    assert torch.equal(RMSNormFunction.apply(x, Norm(norm.weight, norm.variance_epsilon, row.rms_norm)), norm(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_readers_are_every_module_that_reads_the_norms_output(arch):
    llm, layer = first_layer(arch)
    outputs, readers = {}, {}  # tensors kept alive, so that no storage is reused and storages name tensors
    names = {module: name for name, module in layer.named_modules()}

    def record_output(module, args, output):
        outputs[names[module]] = output

    def record_input(module, args, kwargs):
        inputs = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
        readers.setdefault(names[module], []).extend(inputs)

    for norm, _ in LLM_ARCHS[arch].norm_readers:
        layer.get_submodule(norm).register_forward_hook(record_output)
    for module in layer.modules():
        if not list(module.children()):  # the leaves: what reads a tensor, not what passes it on
            module.register_forward_pre_hook(record_input, with_kwargs=True)
    with torch.no_grad():
        llm(input_ids=torch.randint(100, (1, 6)))
    for norm, expected in LLM_ARCHS[arch].norm_readers:
        storage = outputs[norm].untyped_storage().data_ptr()  # views of the output (a reshape) share it
        actual = {name for name, inputs in readers.items()
                  if any(x.untyped_storage().data_ptr() == storage for x in inputs)}
        assert actual == set(expected), norm


@pytest.mark.parametrize("arch", [a for a in ARCHS if LLM_ARCHS[a].gated_mlp])
def test_the_gated_mlp_children_form_down_of_silu_gate_times_up(arch):
    gate, up, down = LLM_ARCHS[arch].gated_mlp
    _, layer = first_layer(arch)
    mlp = layer.get_submodule(gate.rpartition(".")[0])
    assert {up.rpartition(".")[0], down.rpartition(".")[0]} == {gate.rpartition(".")[0]}
    gate, up, down = (layer.get_submodule(path) for path in (gate, up, down))
    assert all(type(m) is nn.Linear for m in (gate, up, down))
    x = torch.randn(3, gate.in_features)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), down(nn.functional.silu(gate(x)) * up(x)))


@pytest.mark.parametrize("arch", [a for a in ARCHS if LLM_ARCHS[a].rotary])
def test_the_rotary_module_applies_rotate_half_with_cos_and_sin_in_the_querys_dtype(arch):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _, layer = first_layer(arch)
    rotary = layer.get_submodule(LLM_ARCHS[arch].rotary)
    q, k = torch.randn(2, 4, 6, 16).bfloat16(), torch.randn(2, 2, 6, 16).bfloat16()
    angles = torch.randn(2, 6, 16)
    cos, sin = angles.cos(), angles.sin()
    expected = apply_rotary_pos_emb(q, k, cos.bfloat16(), sin.bfloat16())
    for out, ref in zip(rotary(q, k, cos, sin), expected):
        assert torch.equal(out, ref)
