"""`enable_fast_lora` on every architecture of the table: PEFT's loss and gradients, or a refusal that says why;
PEFT's parameters and file format throughout; the originals back on `restore()`."""

from __future__ import annotations

import copy

import pytest
import torch

from internvl.archs import LLM_ARCHS, llm_arch
from internvl.lora.fast import enable_fast_lora, maybe_enable_fast_lora, unsupported_reasons
from internvl.lora.fused_modules import FusedGatedMLP, FusedLoraLinear
from internvl.train.checkpointing import CheckpointPlan, checkpointable_layers, set_checkpointed_layers
from tests.builders import lora_grads, tiny_peft_llm, token_batch

TIGHT = dict(rtol=1e-5, atol=1e-6)
ARCHS = sorted(LLM_ARCHS)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYERS = 2  # the tiny LLMs'


def step(model, fast: bool, scale: float = 1.0):
    """Loss and gradients (divided by `scale`, as a GradScaler unscales them) of one step on the same batch."""
    model.zero_grad()
    device = next(model.parameters()).device
    input_ids, labels = (t.to(device) for t in token_batch(length=24))
    with enable_fast_lora(model) if fast else _nothing():
        out = model(input_ids=input_ids, labels=labels)
        (out.loss.float() * scale).backward()
    return out, {name: grad.float() / scale for name, grad in lora_grads(model).items()}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def worst(grads, ref):
    return max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_gets_peft_loss_and_gradients_in_fp32(arch):
    row = llm_arch(arch)
    model = tiny_peft_llm(arch)
    ref, ref_grads = step(model, fast=False)
    with enable_fast_lora(model) as handle:
        expected_mlps = LAYERS if row.gated_mlp else 0
        assert handle.counts["gated_mlps"] == expected_mlps
        assert handle.counts["lora_linears"] == len(row.lora_targets) * LAYERS
        assert handle.counts["folded_norms"] == len(row.norm_readers) * LAYERS
        assert handle.counts["rms_norms"] >= 1  # the final norm, and every norm not folded into its readers
        assert handle.counts["rotary"] == (LAYERS if row.rotary else 0)
        assert handle.counts["fused_loss"] == 1
    out, grads = step(model, fast=True)
    assert out.logits is None  # the point of the fused loss
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    assert ref_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


def with_base_in(model, dtype):
    """A copy whose frozen weights are `dtype` and whose adapters stay float32, as PEFT wraps a 16-bit model."""
    model = copy.deepcopy(model)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(dtype)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "scale"), [(torch.bfloat16, 1.0), (torch.float16, 65536.0)],
                         ids=["bf16", "fp16-scaled"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_in_16_bits_is_as_close_to_fp32_as_peft(arch, dtype, scale, device):
    """Against the same step in float32, the fused path's LoRA gradients are off by no more than PEFT's own (float16
    with the GradScaler's first scale, 65536, which the fused loss once overflowed). On CUDA the elementwise pieces
    run compiled."""
    model = tiny_peft_llm(arch).to(device)
    _, ref = step(model, fast=False)
    model = with_base_in(model, dtype)
    _, peft = step(model, fast=False, scale=scale)
    _, fused = step(model, fast=True, scale=scale)
    assert all(torch.isfinite(grad).all() for grad in fused.values())
    assert worst(fused, ref) < 3 * worst(peft, ref) + 1e-3, (worst(fused, ref), worst(peft, ref))


def test_state_dict_parameters_and_modules_are_peft_own_while_swapped_and_after_restore(tmp_path):
    model = tiny_peft_llm("InternLM2ForCausalLM")
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    model.save_pretrained(tmp_path / "before")
    with enable_fast_lora(model) as handle:
        assert handle.swapped and all(type(m) is not type(modules[f"base_model.model.{p}"])
                                      for p, m in handle.swapped.items())
        assert list(model.state_dict()) == keys
        assert all(param is params[name] for name, param in model.named_parameters())
        assert list(dict(model.named_parameters())) == list(params)
        model.save_pretrained(tmp_path / "swapped")
        with pytest.raises(ValueError, match="already enabled"):
            enable_fast_lora(model)
    assert not handle.swapped
    assert all(module is modules[name] for name, module in model.named_modules())
    assert list(dict(model.named_modules())) == list(modules)
    assert "forward" not in vars(model.get_base_model())
    input_ids, labels = token_batch()
    assert model(input_ids=input_ids, labels=labels).logits is not None
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "swapped" / name).read_bytes()


def test_two_models_swapped_at_once_do_not_interfere():
    first, second = tiny_peft_llm("Qwen2ForCausalLM"), tiny_peft_llm("Qwen2ForCausalLM", seed=1)
    input_ids, labels = token_batch()
    ref = second(input_ids=input_ids, labels=labels).loss
    handle_first, handle_second = enable_fast_lora(first), enable_fast_lora(second)
    handle_first.restore()
    assert not any(isinstance(m, FusedLoraLinear) for m in first.modules())
    assert sum(isinstance(m, FusedLoraLinear) for m in second.modules()) == handle_second.counts["lora_linears"] - 3 * LAYERS
    torch.testing.assert_close(second(input_ids=input_ids, labels=labels).loss, ref, **TIGHT)
    handle_second.restore()


def test_peft_adapter_switches_reach_the_fused_layers_and_outlast_restore():
    model = tiny_peft_llm("Qwen2ForCausalLM")
    input_ids, _ = token_batch()
    with model.disable_adapter():
        base = model(input_ids=input_ids).logits
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with enable_fast_lora(model):
        fused = model.get_base_model().model.layers[0].self_attn.q_proj
        assert isinstance(fused, FusedLoraLinear) and fused.base_layer is layer.base_layer
        with model.disable_adapter():  # PEFT's own forward, base layers only
            torch.testing.assert_close(model(input_ids=input_ids).logits, base, **TIGHT)
        fused.enable_adapters(False)
    assert layer.disable_adapters  # what PEFT set on the fused layer is the original's after restore
    layer.enable_adapters(True)


@pytest.mark.parametrize(("options", "named"), [
    (dict(bias="all"), r"base_layer\.bias"),
    (dict(bias="lora_only"), r"base_layer\.bias"),
    (dict(use_dora=True), "use_dora"),
])
def test_peft_options_the_fused_nodes_do_not_compute_are_refused_by_name(options, named):
    model = tiny_peft_llm("Qwen2ForCausalLM", **options)  # Qwen2's q, k and v projections have biases
    with pytest.raises(ValueError, match=named):
        enable_fast_lora(model)
    assert maybe_enable_fast_lora(model) is None  # CPU, and refused: PEFT's own path with a logged reason


def test_bias_all_without_biases_inside_the_replaced_modules_is_exact():
    model = tiny_peft_llm("LlamaForCausalLM", bias="all")  # LLaMA's projections have no bias
    assert unsupported_reasons(model) == []


@pytest.mark.parametrize("path", ["model.layers.0.self_attn.q_proj.base_layer.weight",
                                  "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"])
def test_a_trainable_weight_inside_a_replaced_module_is_refused_by_name(path):
    model = tiny_peft_llm("Qwen2ForCausalLM")
    model.get_base_model().get_parameter(path).requires_grad_(True)
    assert any(path in reason for reason in unsupported_reasons(model))


def test_what_is_not_a_peft_lora_model_of_a_table_class_is_refused():
    model = tiny_peft_llm("Qwen2ForCausalLM")
    with pytest.raises(ValueError, match="not a PeftModel"):
        enable_fast_lora(model.get_base_model())
    model.get_base_model().config.architectures = ["MistralForCausalLM"]
    with pytest.raises(ValueError, match="MistralForCausalLM has no row in internvl.archs"):
        enable_fast_lora(model)
    model.get_base_model().config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="is a Qwen2ForCausalLM, not the table's"):
        enable_fast_lora(model)


def test_modules_to_save_inside_a_layer_stay_peft_own_and_train_exactly():
    model = tiny_peft_llm("Qwen2ForCausalLM", modules_to_save=["post_attention_layernorm"])
    ref, ref_grads = step(model, fast=False)
    with enable_fast_lora(model) as handle:
        assert handle.counts["folded_norms"] == LAYERS  # input_layernorm only; the trained copies are PEFT's
    out, grads = step(model, fast=True)
    assert any("modules_to_save" in name for name in grads)
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


def test_a_norm_read_by_a_plain_linear_runs_on_its_own():
    model = tiny_peft_llm("Qwen2ForCausalLM", targets=["q_proj", "v_proj"])  # k_proj, a plain Linear, reads it too
    ref, ref_grads = step(model, fast=False)
    with enable_fast_lora(model) as handle:
        assert handle.counts["folded_norms"] == 0
        assert handle.counts["rms_norms"] == 2 * LAYERS + 1
    out, grads = step(model, fast=True)
    torch.testing.assert_close(out.loss, ref.loss, **TIGHT)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


def test_a_trainable_head_keeps_the_model_own_loss():
    model = tiny_peft_llm("Qwen2ForCausalLM", modules_to_save=["lm_head"])
    ref, ref_grads = step(model, fast=False)
    with enable_fast_lora(model) as handle:
        assert handle.counts["fused_loss"] == 0
    out, grads = step(model, fast=True)
    assert out.logits is not None and any("lm_head" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


def test_through_the_trainer_with_gradient_accumulation_the_adapter_is_peft_own(tmp_path):
    """Two optimizer steps of two accumulated micro-batches each (the Trainer passes `num_items_in_batch`), on
    the CPU, where the fused functions run on torch: the same adapter as PEFT's own layers train."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class FastPath(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.handle = enable_fast_lora(model)

        def on_train_end(self, args, state, control, **kwargs):
            self.handle.restore()

    data = []
    for seed in range(8):
        input_ids, labels = token_batch(length=16, seed=seed)
        labels[1, : seed + 1] = -100  # rows of different lengths of loss, so accumulation must weigh tokens
        data += [dict(input_ids=i, labels=l) for i, l in zip(input_ids, labels)]
    adapters = []
    for callbacks in ([], [FastPath()]):
        model = tiny_peft_llm("Qwen2ForCausalLM")
        args = TrainingArguments(output_dir=str(tmp_path / str(len(callbacks))), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, report_to=[],
                                 use_cpu=True, save_strategy="no", lr_scheduler_type="constant", seed=0)
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())  # restored at the end
    for name, weight in adapters[1].items():
        torch.testing.assert_close(weight, adapters[0][name], rtol=1e-4, atol=1e-6, msg=name)


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
        assert all(m.recompute_gate_up for m in llm.modules() if isinstance(m, FusedGatedMLP))
        loss = model(**batch).loss
        loss.backward()
    torch.testing.assert_close(loss, ref, **TIGHT)
    assert ref_grads
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)
