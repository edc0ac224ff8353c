"""`internvl-lora export RUN OUT --for vllm|lmdeploy`: a fine-tune's adapters as one LoRA folder a serving engine
applies to the official base model.

What each engine takes is one row of `ENGINES`, plain data: the key prefix of the LLM's LoRA (per LLM family),
whether it takes a ViT LoRA and with which flag, its serving command and the oldest version known to load such
keys. What an engine cannot take (a ViT LoRA for lmdeploy, weights trained outside LoRA such as the projector,
resized embeddings) is refused with the advice to merge instead. The engines' facts are those of issue 15
(vLLM 0.32 / 0.33, lmdeploy at 1263d5cd); they were not rerun here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from internvl import checkpoint, hf_format
from internvl.train import outputs

# vLLM's --max-lora-rank takes one of these.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Engine:
    """How one serving engine wants an InternVL LoRA adapter."""

    name: str
    min_version: str
    llm_prefix: str  # put before the LLM's own module names (`model.layers.N...`)
    internlm2_llm_prefix: str  # the same for InternLM2-based InternVL
    vision_flag: str | None  # the flag under which it takes a ViT LoRA (keys `vision_model.*`); None: never
    command: str  # {base}, {name}, {adapter}, {rank}, {vision_flag} filled in


ENGINES = {
    # vLLM 0.33 also attaches LLM-only keys; 0.32 and older load them without error and ignore them, so the
    # `language_model.` prefix, which both apply, is what we write.
    "vllm": Engine(
        name="vLLM", min_version="0.32", llm_prefix="language_model.", internlm2_llm_prefix="language_model.",
        vision_flag="--enable-tower-connector-lora",
        command="vllm serve {base} --trust-remote-code --enable-lora --max-lora-rank {rank} "
                "--lora-modules {name}={adapter}{vision_flag}",
    ),
    # lmdeploy applies LoRA on its PyTorch backend only: LLM-only keys for InternLM2-based models, prefixed ones else.
    "lmdeploy": Engine(
        name="lmdeploy", min_version="commit 1263d5cd (PyTorch backend)", llm_prefix="language_model.",
        internlm2_llm_prefix="", vision_flag=None,
        command="lmdeploy serve api_server {base} --backend pytorch --adapters {name}={adapter}",
    ),
}

_MERGE_ADVICE = "merge instead (`internvl-lora merge BASE OUT --adapter {run}`) and serve the merged model"


def _refuse(run: Path, engine: Engine, what: str) -> ValueError:
    return ValueError(f"{run}: {what}, which {engine.name} cannot apply as a LoRA adapter; "
                      + _MERGE_ADVICE.format(run=run))


def export_adapter(run: str | os.PathLike, target: str | os.PathLike, engine_name: str,
                   base: str | os.PathLike | None = None, force: bool = False) -> str:
    """Write the adapters of the fine-tune output folder `run` as one adapter folder for `engine_name` ("vllm" or
    "lmdeploy") into the new or empty folder `target`, with a README naming the serving command and the minimum
    engine version. `base` (default: the manifest's) is the official base the engine serves. Returns the README."""
    if engine_name not in ENGINES:
        raise ValueError(f"--for {engine_name}: must be one of {', '.join(ENGINES)}")
    engine, run, target = ENGINES[engine_name], Path(run), Path(target)
    manifest = outputs.read_manifest(run)
    for field, what in (("trained_weights", "it trained weights outside LoRA"),
                        ("resized_embeddings", "it added tokens to the vocabulary")):
        if manifest.get(field):
            raise _refuse(run, engine, f"{what} ({', '.join(manifest[field][:3])})")
    base_config = outputs.checked_base_config(manifest, run, base, force)
    base = base or manifest["base_model"]
    llm_config = base_config["llm_config"]
    internlm2 = llm_config["architectures"][0] == "InternLM2ForCausalLM"
    prefixes = {"language_model": engine.internlm2_llm_prefix if internlm2 else engine.llm_prefix,
                "vision_model": hf_format.PARTS["vision_model"]}
    configs, weights = [], {}
    for part, info in manifest["lora"].items():
        if part == "vision_model" and engine.vision_flag is None:
            raise _refuse(run, engine, "it holds a ViT LoRA")
        config, state = outputs.read_adapter(run / info["adapter"], part, manifest.get("base_format", "original"),
                                             llm_config)
        try:
            hf_format.check_plain_lora(config, str(run / info["adapter"] / outputs.ADAPTER_CONFIG))
        except hf_format.NotConvertible as error:
            raise _refuse(run, engine, str(error)) from None
        configs.append(config)
        for key, tensor in state.items():
            weights[hf_format.PEFT_PREFIX + prefixes[part] + key.removeprefix(hf_format.PEFT_PREFIX)] = tensor
    if not configs:
        raise ValueError(f"{run}: holds no LoRA adapter to export")
    settings = {(c["r"], c["lora_alpha"], bool(c.get("use_rslora"))) for c in configs}
    if len(settings) > 1:
        raise _refuse(run, engine, "its LLM and ViT LoRAs have different ranks or alphas, which one adapter "
                                   f"cannot hold ({sorted(settings)})")
    config = {**configs[0], "target_modules": hf_format.original_target_modules(weights), "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(base)}
    rank = next(r for r in VLLM_RANKS if r >= config["r"]) if config["r"] <= VLLM_RANKS[-1] else config["r"]
    vision = "vision_model" in manifest["lora"]
    command = engine.command.format(base=base, name=run.name or "adapter", adapter=target, rank=rank,
                                    vision_flag=f" {engine.vision_flag}" if vision else "")
    readme = (f"# {run.name} for {engine.name}\n\nLoRA adapter of {base} ({', '.join(manifest['lora'])}), "
              f"exported from {run} by internvl-lora.\n\nServe it with {engine.name} {engine.min_version} or "
              f"newer:\n\n```bash\n{command}\n```\n\nPrompts must use the template the run was trained with: "
              f"{manifest.get('serving', {}).get('template', 'the base model’s')}.\n")
    with checkpoint.atomic_directory(target) as staging:
        outputs.write_adapter(staging, config, weights)
        (staging / "README.md").write_text(readme)
    return readme

