"""Time one LoRA training step of InternVL's LLMs: HF + PEFT against the fused path (internvl.lora.fused).

One command on a CUDA machine, no download: each model is built with random bf16 weights at the full 7B shape
(or `--layers N` of them), wrapped in PEFT LoRA (r 16, alpha 32, dropout 0.05, the arch table's targets), and
trained on one random batch of `--seq` tokens:

    python bench/bench_lora_step.py                 # InternLM2.5-7B and Qwen2.5-7B shapes, 32 / 28 layers
    python bench/bench_lora_step.py --layers 4      # quick check

Configurations, per model, in one run on the same weights:
- `peft`: HF + PEFT, gradient checkpointing on every layer (the official recipe).
- `fast`: `enable_fast_lora` plus `fit_checkpointing` within the `peft` configuration's peak memory.
A step is forward + backward + AdamW on the LoRA parameters; the figure is the median of `--steps` timed steps
after `--warmup`. Before timing, one step of each with dropout off gives the relative difference of the loss and
of every LoRA gradient (the largest ||g - g_peft|| / ||g_peft|| over the LoRA tensors).
TFLOP/s counts useful work only: 4 * params * tokens for the linear layers (forward, and the input gradient;
frozen weights get none) plus 6 * tokens^2 * width per layer for causal attention; no recompute.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from internvl.archs import llm_arch, resolve
from internvl.lora.fused import checkpointable_layers, enable_fast_lora, fit_checkpointing, set_checkpointed_layers

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


def build(arch: str, layers: int | None, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, str]:
    """A PEFT-wrapped LLM with random weights on the GPU, and the class it was built from."""
    row, shape = llm_arch(arch), dict(SHAPES[arch])
    if layers:
        shape["num_hidden_layers"] = layers
    try:
        model_class, config_class, targets = resolve(row.model_class), resolve(row.config_class), row.lora_targets
    except (ImportError, AttributeError):  # InternLM2 still being written: the same shapes as a LLaMA
        stand_in = llm_arch("LlamaForCausalLM")
        model_class, config_class, targets = (
            resolve(stand_in.model_class), resolve(stand_in.config_class), stand_in.lora_targets)
        shape.pop("bias", None)
    config = config_class(**shape, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        llm = model_class._from_config(config, dtype=dtype)
    model = get_peft_model(llm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(targets),
                                           task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():  # a trained-looking B, so every gradient is non-zero
        if "lora_B" in name:
            nn.init.normal_(param, std=0.01)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train(), model_class.__name__


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


def useful_flops(model, tokens: int) -> float:
    config = model.get_base_model().config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 4 * linear * tokens + 6 * tokens**2 * config.hidden_size * config.num_hidden_layers


def run(arch: str, args) -> list[dict]:
    model, built_from = build(arch, args.layers, getattr(torch, args.dtype))
    vocab = model.get_base_model().config.vocab_size
    generator = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(vocab, (1, args.seq), device="cuda", generator=generator)
    batch = dict(input_ids=input_ids, labels=input_ids.clone())
    tokens, flops = input_ids.numel(), useful_flops(model, input_ids.numel())

    ref_loss, ref_grads = grads_without_dropout(model, batch)
    handle = enable_fast_lora(model)
    loss, grads = grads_without_dropout(model, batch)
    handle.restore()
    loss_diff = (abs(loss - ref_loss) / abs(ref_loss)).item()
    grad_diff = report_diffs(f"{arch}: fast vs peft", loss, grads, ref_loss, ref_grads)
    if args.fp32_reference:  # how far each bf16 run is from the same step in float32: bf16's own noise
        model32 = copy.deepcopy(model).float()
        loss32, grads32 = grads_without_dropout(model32, batch)
        del model32
        report_diffs(f"{arch}: peft bf16 vs fp32", ref_loss, ref_grads, loss32, grads32)
        report_diffs(f"{arch}: fast bf16 vs fp32", loss, grads, loss32, grads32)
        del grads32
    del ref_grads, grads

    rows = []
    seconds, peak = time_steps(model, batch, args.warmup, args.steps)
    rows.append(dict(config="peft", seconds=seconds, peak=peak, uncheckpointed=0))
    # fit_checkpointing steps without the optimizer: leave room for AdamW's two moments of every LoRA weight.
    adam_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    budget = int(peak * GiB) - adam_bytes

    handle = enable_fast_lora(model)
    t0 = time.perf_counter()
    uncheckpointed = fit_checkpointing(model, step_fn(model, batch), budget)
    fit_s = time.perf_counter() - t0
    if args.profile:
        profile(model, batch)
    seconds, peak = time_steps(model, batch, args.warmup, args.steps)
    rows.append(dict(config="fast", seconds=seconds, peak=peak, uncheckpointed=uncheckpointed,
                     loss_diff=loss_diff, grad_diff=grad_diff, fit_s=fit_s))
    if args.no_checkpointing:
        set_checkpointed_layers(model, len(checkpointable_layers(model)))
        seconds, peak = time_steps(model, batch, args.warmup, args.steps)
        rows.append(dict(config="fast, no ckpt", seconds=seconds, peak=peak, uncheckpointed=-1))
    handle.restore()
    layers = model.get_base_model().config.num_hidden_layers
    for row in rows:
        row.update(model=f"{arch} ({built_from}, {layers} layers, seq {args.seq})", tokens_s=tokens / row["seconds"],
                   tflops=flops / row["seconds"] / 1e12, speedup=rows[0]["seconds"] / row["seconds"])
    del model, handle
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the full model)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--fp32-reference", action="store_true", help="also compare both to a float32 copy")
    parser.add_argument("--profile", action="store_true", help="print the fast path's kernels, most time first")
    parser.add_argument("--no-checkpointing", action="store_true", help="also time the fast path with none")
    args = parser.parse_args()
    import peft
    import transformers

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}", flush=True)
    rows = [row for arch in args.arch for row in run(arch, args)]
    print(f"\n{'model':<58} {'config':<14} {'s/step':>7} {'tok/s':>7} {'TFLOP/s':>7} {'peak GiB':>8} "
          f"{'x peft':>6} {'no-ckpt':>7} {'loss rel':>9} {'grad rel':>9}")
    for r in rows:
        diffs = f"{r['loss_diff']:9.2e} {r['grad_diff']:9.2e}" if "loss_diff" in r else ""
        print(f"{r['model']:<58} {r['config']:<14} {r['seconds']:7.3f} {r['tokens_s']:7.0f} {r['tflops']:7.1f} "
              f"{r['peak']:8.2f} {r['speedup']:6.2f} {r['uncheckpointed']:7d} {diffs}")


if __name__ == "__main__":
    main()
