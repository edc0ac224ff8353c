"""Time one LoRA training step of InternVL's LLMs: HF + PEFT against the fused path (internvl.lora.fast).

One command on a CUDA machine, no download: each model is built with random bf16 weights at the full 7B shape
(or `--layers N` of them), wrapped in PEFT LoRA (r 16, alpha 32, dropout 0.05, the arch table's targets), and
trained on one random batch of `--seq` tokens:

    python bench/bench_lora_step.py --no-checkpointing --vlm   # the README's table
    python bench/bench_lora_step.py --layers 4                 # quick check

Configurations, per model, in one run on the same weights:
- `peft`: HF + PEFT, gradient checkpointing on every layer (the official recipe).
- `fast`: `enable_fast_lora` plus `fit_checkpointing` within the `peft` configuration's peak memory.
- `fast, no ckpt` (`--no-checkpointing`): the fused path with every activation kept, whatever the memory.
- `peft + liger` (`--liger`, Qwen2 only, when liger-kernel is installed): the same PEFT model with liger-kernel's
  Qwen2 patches (rope, RMSNorm, SwiGLU, fused linear cross-entropy), every layer checkpointed. Liger patches
  transformers' Qwen2 module for the whole process, so this row runs last for its model.
`--vlm` adds the whole InternVL2.5-8B step of the official LoRA recipe (InternViT-300M and projector frozen, LoRA
on the LLM): 7 tiles of 448 px (1,792 image tokens) in a `--seq`-token sample.
A step is forward + backward + AdamW on the LoRA parameters; the figure is the median of `--steps` timed steps
after `--warmup`. Before timing, one step of each with dropout off gives the relative difference of the loss and
of every LoRA gradient (the largest ||g - g_peft|| / ||g_peft|| over the LoRA tensors).
TFLOP/s counts useful work only: 4 * params * tokens for the LLM's linear layers (forward, and the input
gradient; frozen weights get none) plus 6 * tokens^2 * width per layer for causal attention, plus 2 * params
* tokens for the ViT's forward in the VLM step; no recompute.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from internvl.archs import llm_arch, resolve
from internvl.model.chat_config import InternVLChatConfig
from internvl.model.internvl_chat import InternVLChatModel
from internvl.zoo import official_config
from internvl.lora.fast import enable_fast_lora
from internvl.train.checkpointing import (
    CheckpointPlan,
    checkpointable_layers,
    fit_checkpointing,
    set_checkpointed_layers,
)

SHAPES = {
    # InternVL2.5-8B's LLM (InternLM2.5-7B-chat)
    "InternLM2ForCausalLM": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, intermediate_size=14336, vocab_size=92553,
                                 rope_theta=1000000.0, rms_norm_eps=1e-5, bias=False, tie_word_embeddings=False),
    # InternVL3-8B's LLM (Qwen2.5-7B)
    "Qwen2ForCausalLM": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             intermediate_size=18944, vocab_size=151674, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=False),
}
GiB = 2**30


def build(arch: str, layers: int | None, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A PEFT-wrapped LLM with random weights on the GPU, checkpointing on, in training mode."""
    row, shape = llm_arch(arch), dict(SHAPES[arch])
    if layers:
        shape["num_hidden_layers"] = layers
    config = resolve(row.config_class)(**shape, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        llm = resolve(row.model_class)._from_config(config, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(row.lora_targets),
                      task_type="CAUSAL_LM")
    model = get_peft_model(llm, lora)
    randomize_lora_b(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train()


def randomize_lora_b(model: nn.Module) -> None:
    """A trained-looking B (PEFT starts it at zero), so every gradient is non-zero."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.01)


def build_vlm(layers: int | None, dtype: torch.dtype, seed: int = 0) -> InternVLChatModel:
    """InternVL2.5-8B with random weights, set up as the official LoRA recipe: ViT and projector frozen, the LLM
    frozen and wrapped with LoRA r 16 / alpha 32 / dropout 0.05, gradient checkpointing on."""
    config = official_config("InternVL2_5-8B")
    config["llm_config"].update(attn_implementation="sdpa", use_cache=False)
    if layers:
        config["llm_config"]["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = InternVLChatModel._from_config(InternVLChatConfig(**config), dtype=dtype)
    model.img_context_token_id = 92546  # <IMG_CONTEXT> in InternVL2.5-8B's tokenizer
    model.requires_grad_(False)
    model.wrap_llm_lora(r=16, lora_alpha=32, lora_dropout=0.05)
    randomize_lora_b(model.language_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def step_fn(model, batch):
    def step():
        loss = model(**batch).loss
        loss.backward()
        return loss

    return step


def grads_without_dropout(model, batch):
    """Loss and LoRA gradients of one step with every dropout off (so PEFT and the fused path compare)."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in dropouts:
        m.eval()
    loss = step_fn(model, batch)().detach().float()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no LoRA gradients"
    model.zero_grad(set_to_none=True)
    for m in dropouts:
        m.train()
    return loss, grads


def report_diffs(title, loss, grads, ref_loss, ref_grads) -> float:
    """Print the loss's and the LoRA gradients' relative differences to a reference; return the largest."""
    diffs = {n: ((grads[n].float() - g.float()).norm() / g.float().norm()).item() for n, g in ref_grads.items()}
    worst = max(diffs, key=diffs.get)
    print(f"{title}: loss {loss.item():.5f} vs {ref_loss.item():.5f}; LoRA grads relative diff median "
          f"{statistics.median(diffs.values()):.2e}, max {diffs[worst]:.2e} ({worst})", flush=True)
    return diffs[worst]


def time_steps(model, batch, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds of a full training step (with AdamW on the LoRA weights), and the peak GiB allocated."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
    step = step_fn(model, batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    del optimizer
    return statistics.median(times), torch.cuda.max_memory_allocated() / GiB


def profile(model, batch) -> None:
    """Print the CUDA kernels of two training steps, most time first."""
    step = step_fn(model, batch)
    step()
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))


VLM = "InternVL2_5-8B"
TILES = 7


def useful_flops(llm: nn.Module, tokens: int, vision: nn.Module | None = None) -> float:
    config = llm.get_base_model().config
    linear = sum(m.weight.numel() for m in llm.modules() if isinstance(m, nn.Linear))
    flops = 4 * linear * tokens + 6 * tokens**2 * config.hidden_size * config.num_hidden_layers
    if vision is not None:  # frozen and without gradients: forward only, the class token and the patches
        tile_tokens = (vision.config.image_size // vision.config.patch_size) ** 2 + 1
        flops += 2 * sum(p.numel() for p in vision.parameters()) * TILES * tile_tokens
    return flops


def text_batch(vocab: int, seq: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(vocab, (1, seq), device="cuda", generator=generator)
    return dict(input_ids=input_ids, labels=input_ids.clone())


def vlm_batch(model: InternVLChatModel, seq: int, dtype: torch.dtype) -> dict:
    """One sample as the data pipeline makes it: 7 tiles' image tokens after a short prompt, loss on the rest."""
    batch = text_batch(model.img_context_token_id, seq)  # random text ids below <IMG_CONTEXT>
    image_tokens = TILES * model.num_image_token
    batch["input_ids"][0, 16 : 16 + image_tokens] = model.img_context_token_id
    batch["labels"][0, : 16 + image_tokens] = -100
    generator = torch.Generator(device="cuda").manual_seed(1)
    size = model.config.force_image_size or model.config.vision_config.image_size
    batch["pixel_values"] = torch.randn(TILES, 3, size, size, device="cuda", generator=generator, dtype=dtype)
    batch["image_flags"] = torch.ones(TILES, dtype=torch.long, device="cuda")
    return batch


def plan_label(plan: CheckpointPlan) -> str:
    """A plan as the table's layers column shows it."""
    return f"{plan.keep} kept, {plan.recompute_mlp} MLP"


def run(name: str, args) -> list[dict]:
    # A training process holds one model: compile its kernels for its own shapes, not dynamic ones made to
    # cover the previous model's as well.
    torch._dynamo.reset()
    dtype = getattr(torch, args.dtype)
    if name == VLM:
        model = build_vlm(args.layers, dtype)
        llm, batch = model.language_model, vlm_batch(model, args.seq, dtype)
        flops = useful_flops(llm, args.seq, model.vision_model)
    else:
        model = llm = build(name, args.layers, dtype)
        batch = text_batch(llm.get_base_model().config.vocab_size, args.seq)
        flops = useful_flops(llm, args.seq)

    ref_loss, ref_grads = grads_without_dropout(model, batch)
    with enable_fast_lora(llm):
        loss, grads = grads_without_dropout(model, batch)
    loss_diff = (abs(loss - ref_loss) / abs(ref_loss)).item()
    grad_diff = report_diffs(f"{name}: fast vs peft", loss, grads, ref_loss, ref_grads)
    if args.fp32_reference:  # how far each bf16 run is from the same step in float32: bf16's own noise
        model32 = copy.deepcopy(model).float()
        loss32, grads32 = grads_without_dropout(model32, batch)
        del model32
        report_diffs(f"{name}: peft bf16 vs fp32", ref_loss, ref_grads, loss32, grads32)
        report_diffs(f"{name}: fast bf16 vs fp32", loss, grads, loss32, grads32)
        del grads32
    del ref_grads, grads

    rows = []
    seconds, peak = time_steps(model, batch, args.warmup, args.steps)
    rows.append(dict(config="peft", seconds=seconds, peak=peak, plan="every layer checkpointed"))
    # fit_checkpointing steps without the optimizer: leave room for AdamW's two moments of every LoRA weight.
    adam_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    budget = int(peak * GiB) - adam_bytes

    handle = enable_fast_lora(llm)
    t0 = time.perf_counter()
    plan = fit_checkpointing(llm, step_fn(model, batch), budget)
    fit_s = time.perf_counter() - t0
    print(f"{name}: fit_checkpointing chose {plan} in {fit_s:.1f} s", flush=True)
    if args.profile:
        profile(model, batch)
    seconds, peak = time_steps(model, batch, args.warmup, args.steps)
    rows.append(dict(config="fast", seconds=seconds, peak=peak, plan=plan_label(plan), loss_diff=loss_diff,
                     grad_diff=grad_diff))
    layer_count = len(checkpointable_layers(llm))
    extra = [("fast, all ckpt", CheckpointPlan()), ("fast, all MLP", CheckpointPlan(recompute_mlp=layer_count))]
    extra = extra if args.plans else []
    extra += [("fast, no ckpt", CheckpointPlan(keep=layer_count))] if args.no_checkpointing else []
    for config, fixed in extra:
        set_checkpointed_layers(llm, fixed)
        seconds, peak = time_steps(model, batch, args.warmup, args.steps)
        rows.append(dict(config=config, seconds=seconds, peak=peak, plan=plan_label(fixed)))
    handle.restore()
    if args.liger:
        rows += liger_rows(name, model, batch, args, ref_loss)
    layers = llm.get_base_model().config.num_hidden_layers
    label = f"{name} (InternLM2 LLM + InternViT-300M)" if name == VLM else name
    for row in rows:
        row.update(model=f"{label}, {layers} layers, seq {args.seq}", tokens_s=args.seq / row["seconds"],
                   tflops=flops / row["seconds"] / 1e12, speedup=rows[0]["seconds"] / row["seconds"])
    del model, llm, handle
    torch.cuda.empty_cache()
    return rows


LIGER = {"Qwen2ForCausalLM": "apply_liger_kernel_to_qwen2"}  # InternLM2 (our own class) has no Liger patch


def liger_rows(name: str, model, batch, args, ref_loss) -> list[dict]:
    """The `peft + liger` row: the same PEFT model and batch with liger-kernel's patches, every layer checkpointed."""
    if name not in LIGER:
        print(f"{name}: --liger: liger-kernel has no patch for this class; row skipped", flush=True)
        return []
    if importlib.util.find_spec("liger_kernel") is None:
        print(f"{name}: --liger: liger-kernel is not installed (pip install liger-kernel); row skipped", flush=True)
        return []
    import liger_kernel.transformers as liger

    getattr(liger, LIGER[name])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model.get_base_model())
    set_checkpointed_layers(model, CheckpointPlan())
    loss, _ = grads_without_dropout(model, batch)
    print(f"{name}: peft + liger loss {loss.item():.5f} vs peft {ref_loss.item():.5f}", flush=True)
    seconds, peak = time_steps(model, batch, args.warmup, args.steps)
    return [dict(config="peft + liger", seconds=seconds, peak=peak, plan="every layer checkpointed",
                 loss_diff=(abs(loss - ref_loss) / abs(ref_loss)).item(), grad_diff=float("nan"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--vlm", action="store_true", help="also time the whole InternVL2.5-8B step")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the full model)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--fp32-reference", action="store_true", help="also compare both to a float32 copy")
    parser.add_argument("--profile", action="store_true", help="print the fast path's kernels, most time first")
    parser.add_argument("--no-checkpointing", action="store_true", help="also time the fast path with none")
    parser.add_argument("--liger", action="store_true",
                        help="also time HF + PEFT with liger-kernel's patches (Qwen2; skipped when not installed)")
    parser.add_argument("--plans", action="store_true",
                        help="also time every layer checkpointed and every layer MLP-recomputed (the plan's costs)")
    args = parser.parse_args()
    import peft
    import transformers

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}", flush=True)
    rows = [row for name in args.arch + [VLM] * args.vlm for row in run(name, args)]
    print(f"\n{'model':<62} {'config':<14} {'s/step':>7} {'tok/s':>7} {'TFLOP/s':>7} {'peak GiB':>8} "
          f"{'x peft':>6} {'layers':<22} {'loss rel':>9} {'grad rel':>9}")
    for r in rows:
        diffs = f"{r['loss_diff']:9.2e} {r['grad_diff']:9.2e}" if "loss_diff" in r else ""
        print(f"{r['model']:<62} {r['config']:<14} {r['seconds']:7.3f} {r['tokens_s']:7.0f} {r['tflops']:7.1f} "
              f"{r['peak']:8.2f} {r['speedup']:6.2f} {r['plan']:<22} {diffs}")


if __name__ == "__main__":
    main()
