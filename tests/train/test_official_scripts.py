"""Every official LoRA script's argument list runs unchanged through `internvl-lora finetune`.

The lists below are the official ones (OpenGVLab/InternVL, `internvl_chat/shell/internvl{1.2,1.5,2.0,2.5}/`
`2nd_finetune/*_lora.sh` and `shell/hermes2_yi34b/`), in order. Only what a test machine cannot have is
substituted: the model path (a tiny official-format model of the same LLM family), the meta file, the output folder,
the shell variables, `--bf16` (a CPU) and `--deepspeed` (no DeepSpeed in CI); `--max_steps 2` keeps each run to two
steps (the first, in warm-up, has a learning rate of 0). The InternVL3.5 `*_sft.sh` lists (full SFT with packing) are turned into LoRA runs as users do: the three
parts frozen, `--use_llm_lora 16`.
"""

from __future__ import annotations

import re
import shlex

import pytest
from safetensors.torch import load_file

from internvl.cli import main
from internvl.data.tokenizer import load_tokenizer
from internvl.synthetic import write_dataset, write_meta
from internvl.tiny import tiny_tokenizer
from tests.builders import build_model
from tests.data.builders import phi3_style_tokenizer
from tests.data.test_tokenizer import write_internlm2_checkpoint

# The InternVL 1.2 scripts (Yi-34B, Hermes-2), one list each.
V1_2_RES = """--model_name_or_path "./pretrained/InternVL-Chat-V1-2-Plus" --conv_style "Hermes-2" --output_dir ${OUTPUT_DIR}
--meta_path "./shell/data/internvl_1_2_finetune_custom.json" --overwrite_output_dir True --force_image_size 448
--max_dynamic_patch 1 --down_sample_ratio 0.5 --drop_path_rate 0.0 --freeze_llm True --freeze_mlp True
--freeze_backbone True --use_llm_lora 16 --vision_select_layer -1 --dataloader_num_workers 4 --bf16 True
--num_train_epochs 1 --per_device_train_batch_size ${PER_DEVICE_BATCH_SIZE} --gradient_accumulation_steps ${GRADIENT_ACC}
--evaluation_strategy "no" --save_strategy "steps" --save_steps 200 --save_total_limit 1 --learning_rate 1e-5
--weight_decay 0.05 --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1 --max_seq_length 2048
--do_train True --grad_checkpoint True --group_by_length True --dynamic_image_size False --use_thumbnail False
--ps_version 'v1' --deepspeed "zero_stage3_config_34b.json" --report_to "tensorboard" """
V1_2_CONTINUE = """--model_name_or_path "{model}" --conv_style "Hermes-2" --output_dir ${{OUTPUT_DIR}}
--meta_path "./path/to/your/custom/meta/file" --overwrite_output_dir True --force_image_size 448
--down_sample_ratio 0.5 --drop_path_rate 0.0 --pad2square False --freeze_llm True --freeze_mlp True
--freeze_backbone True --use_llm_lora 16 --vision_select_layer -1 --use_data_resampling False
--dataloader_num_workers {workers} --bf16 True --num_train_epochs 1 --per_device_train_batch_size ${{PER_DEVICE_BATCH_SIZE}}
--gradient_accumulation_steps ${{GRADIENT_ACC}} --evaluation_strategy "no" --save_strategy "steps" --save_steps 200
--save_total_limit 1 --learning_rate 1e-5 --weight_decay 0.05 --warmup_ratio 0.03 --lr_scheduler_type "cosine"
--logging_steps 1 --max_seq_length 2048 {grouping}--do_train True --grad_checkpoint True {grouping_after}
--deepspeed "zero_stage3_config.json" --report_to "tensorboard" """
# InternVL 1.5 and 2.0: one list, these values differing.
V2_0 = """--model_name_or_path "{model}" --conv_style "{conv}" --output_dir ${{OUTPUT_DIR}}
--meta_path "./shell/data/internvl_1_2_finetune_custom.json" --overwrite_output_dir True --force_image_size 448
--max_dynamic_patch {mdp} --down_sample_ratio 0.5 --drop_path_rate 0.0 --freeze_llm True --freeze_mlp True
--freeze_backbone True --use_llm_lora 16 --vision_select_layer -1 --dataloader_num_workers 4 --bf16 True
--num_train_epochs 1 --per_device_train_batch_size ${{PER_DEVICE_BATCH_SIZE}} --gradient_accumulation_steps ${{GRADIENT_ACC}}
--evaluation_strategy "no" --save_strategy "steps" --save_steps 200 --save_total_limit 1 --learning_rate {lr}
--weight_decay {wd} --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1 --max_seq_length 4096
--do_train True --grad_checkpoint True --group_by_length True --dynamic_image_size True --use_thumbnail True
--ps_version 'v2' --deepspeed "{ds}" --report_to "tensorboard" """
# InternVL 2.5: the 2.0 list with --use_fast_tokenizer False and 8192 tokens.
V2_5 = """--model_name_or_path "{model}" --conv_style "internvl2_5" --use_fast_tokenizer False --output_dir ${{OUTPUT_DIR}}
--meta_path "{meta}" --overwrite_output_dir True --force_image_size 448 --max_dynamic_patch 6 --down_sample_ratio 0.5
--drop_path_rate 0.0 --freeze_llm True --freeze_mlp True --freeze_backbone True --use_llm_lora {r}
--vision_select_layer -1 --dataloader_num_workers 4 --bf16 True --num_train_epochs 1
--per_device_train_batch_size ${{PER_DEVICE_BATCH_SIZE}} --gradient_accumulation_steps ${{GRADIENT_ACC}}
--evaluation_strategy "no" --save_strategy "steps" --save_steps 200 --save_total_limit 1 --learning_rate {lr}
--weight_decay {wd} --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1 --max_seq_length 8192
--do_train True --grad_checkpoint True --group_by_length True --dynamic_image_size True --use_thumbnail True
--ps_version 'v2' --deepspeed "{ds}" --report_to "tensorboard" """
CUSTOM = "./shell/data/internvl_1_2_finetune_custom.json"

# script -> (LLM architecture of its model, tokenizer family, argument list)
SCRIPTS = {
    "internvl1.2/internvl_chat_v1_2_hermes2_yi34b_448_res_2nd_finetune_lora": ("LlamaForCausalLM", "bpe", V1_2_RES),
    "hermes2_yi34b/internvl_chat_v1_2_hermes2_yi34b_448_finetune_continue_lora": (
        "LlamaForCausalLM", "bpe",
        V1_2_CONTINUE.format(model="./pretrained/InternVL-Chat-Chinese-V1-2", workers=2, grouping="",
                             grouping_after="")),
    "hermes2_yi34b/internvl_chat_v1_2_hermes2_yi34b_448_res_finetune_continue_lora": (
        "LlamaForCausalLM", "bpe",
        V1_2_CONTINUE.format(model="./pretrained/InternVL-Chat-V1-2-Plus", workers=4, grouping="",
                             grouping_after="--group_by_length True")),
    "internvl1.5/internvl_chat_v1_5_internlm2_1_8b_dynamic_res_2nd_finetune_lora": (
        "InternLM2ForCausalLM", "internlm2",
        V2_0.format(model="./pretrained/Mini-InternVL-Chat-2B-V1-5", conv="internlm2-chat", mdp=12, lr="4e-5",
                    wd=0.01, ds="zero_stage1_config.json")),
    **{f"internvl2.0/{name}": (arch, tokenizer, V2_0.format(model=model, conv=conv, mdp=6, lr=lr, wd=wd, ds=ds))
       for name, arch, tokenizer, model, conv, lr, wd, ds in [
           ("internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora", "Qwen2ForCausalLM", "bpe",
            "./pretrained/InternVL2-1B", "Hermes-2", "4e-5", 0.01, "zero_stage1_config.json"),
           ("internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora", "InternLM2ForCausalLM", "internlm2",
            "./pretrained/InternVL2-2B", "internlm2-chat", "4e-5", 0.01, "zero_stage1_config.json"),
           ("internvl2_4b_phi3_3_8b_dynamic_res_2nd_finetune_lora", "Phi3ForCausalLM", "phi3",
            "./pretrained/InternVL2-4B", "phi3-chat", "4e-5", 0.01, "zero_stage1_config.json"),
           ("internvl2_8b_internlm2_7b_dynamic_res_2nd_finetune_lora", "InternLM2ForCausalLM", "internlm2",
            "./pretrained/InternVL2-8B", "internlm2-chat", "4e-5", 0.05, "zero_stage1_config.json"),
           ("internvl2_40b_hermes2_yi_34b_dynamic_res_2nd_finetune_lora", "LlamaForCausalLM", "bpe",
            "./pretrained/InternVL2-40B", "Hermes-2", "2e-5", 0.05, "zero_stage3_config_34b.json"),
       ]},
    **{f"internvl2.5/internvl2_5_{size}_dynamic_res_2nd_finetune_lora{suffix}": (
        arch, tokenizer, V2_5.format(model=f"OpenGVLab/InternVL2_5-{size.upper()}", meta=meta, r=r, lr=lr, wd=wd, ds=ds))
       for size, suffix, arch, tokenizer, meta, r, lr, wd, ds in [
           ("1b", "", "Qwen2ForCausalLM", "bpe", CUSTOM, 16, "4e-5", 0.01, "zero_stage1_config.json"),
           ("2b", "", "InternLM2ForCausalLM", "internlm2", CUSTOM, 16, "4e-5", 0.01, "zero_stage1_config.json"),
           ("2b", "_coco", "InternLM2ForCausalLM", "internlm2", "./shell/data/coco_caption.json", 128, "4e-5", 0.01,
            "zero_stage1_config.json"),
           ("4b", "", "Qwen2ForCausalLM", "bpe", CUSTOM, 16, "4e-5", 0.01, "zero_stage1_config.json"),
           ("8b", "", "InternLM2ForCausalLM", "internlm2", CUSTOM, 16, "4e-5", 0.05, "zero_stage1_config.json"),
           ("26b", "", "InternLM2ForCausalLM", "internlm2", CUSTOM, 16, "2e-5", 0.05, "zero_stage3_config.json"),
           ("38b", "", "Qwen2ForCausalLM", "bpe", CUSTOM, 16, "2e-5", 0.05, "zero_stage3_config_34b.json"),
           ("78b", "", "Qwen2ForCausalLM", "bpe", CUSTOM, 16, "2e-5", 0.05, "zero_stage3_config_100b.json"),
       ]},
}

# What only a test machine changes: each flag's new value (None: the flag and its value are dropped).
SUBSTITUTES = {"--bf16": "False", "--deepspeed": None, "--dataloader_num_workers": "0", "--report_to": "none"}
SHELL = {"${OUTPUT_DIR}": None, "${PER_DEVICE_BATCH_SIZE}": "2", "${GRADIENT_ACC}": "1", "${CURRENT_PATH}": "."}


def substituted(script_args: str, model: str, meta: str, output_dir: str) -> list[str]:
    """The script's arguments with the paths, shell variables, --bf16 and --deepspeed substituted."""
    args = shlex.split(script_args)
    out = []
    for flag, value in zip(args[::2], args[1::2]):
        value = {"--model_name_or_path": model, "--meta_path": meta, "--output_dir": output_dir}.get(
            flag, SHELL.get(value, value))
        if flag in SUBSTITUTES:
            value = SUBSTITUTES[flag]
        if value is not None:
            out += [flag, value]
    return out


def _tokenizer(kind: str, folder):
    if kind == "internlm2":
        return load_tokenizer(write_internlm2_checkpoint(folder))
    return phi3_style_tokenizer() if kind == "phi3" else tiny_tokenizer()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny official-format base per (LLM architecture, tokenizer family, template) the scripts use."""
    root = tmp_path_factory.mktemp("official")
    built = {}
    for arch, kind, script_args in SCRIPTS.values():
        conv = shlex.split(script_args)[shlex.split(script_args).index("--conv_style") + 1]
        key = (arch, kind, conv)
        if key not in built:
            folder = root / "-".join(key)
            tokenizer = _tokenizer(kind, root / f"tokenizer-{kind}")
            build_model(arch, template=conv, vocab_size=len(tokenizer)).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[key] = folder
    data = write_dataset(root / "data", "shapes", ("colour",), 8, 56, seed=0)
    return built, write_meta(root / "meta.json", {"shapes": data})


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_an_official_lora_script_trains_unchanged(script, bases, tmp_path, capsys):
    built, meta = bases
    arch, kind, script_args = SCRIPTS[script]
    conv = shlex.split(script_args)[shlex.split(script_args).index("--conv_style") + 1]
    out = tmp_path / "out"
    argv = substituted(script_args, str(built[arch, kind, conv]), str(meta), str(out))
    assert main(["finetune", *argv, "--max_steps", "2", "--use_cpu", "True", "--disable_tqdm", "True"]) == 0
    printed = capsys.readouterr().out
    assert "trainable:" in printed and "language_model LoRA r=" in printed
    adapter = load_file(out / "llm_adapter" / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for key, tensor in adapter.items() if "lora_B" in key)  # PEFT starts B at 0


# The InternVL3.5 SFT scripts (internvl_chat_gpt_oss/shell/internvl3_5_{qwen3,gpt_oss}/*_sft.sh): one list, these
# values differing; full SFT with packing, turned into LoRA as users do.
V3_5_SFT = """--model_name_or_path "{model}" --conv_style "{conv}" --use_fast_tokenizer False --output_dir ${{OUTPUT_DIR}}
--meta_path "${{CURRENT_PATH}}/shell/data/debug_sft.json" --overwrite_output_dir True --force_image_size 448
--max_dynamic_patch 12 --down_sample_ratio 0.5 --drop_path_rate {dpr} --min_num_frame 8 --max_num_frame 32
--freeze_llm False --freeze_mlp False --freeze_backbone False --vision_select_layer -1 --dataloader_num_workers 16
--bf16 True --max_steps 8000 --per_device_train_batch_size ${{PER_DEVICE_BATCH_SIZE}}
--gradient_accumulation_steps ${{GRADIENT_ACC}} --save_strategy "steps" --save_steps 500 --save_total_limit 100
--learning_rate {lr} --weight_decay 0.05 --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1
--max_seq_length 32768 --split_annotations True --do_train True --grad_checkpoint True --gradient_checkpointing True
--group_by_length False --dynamic_image_size True --use_thumbnail True --ps_version 'v2' --use_custom_flash_attn {ucfa}
--report_to "tensorboard" --deepspeed "zero_stage3_config.json" --use_packed_ds True --num_images_expected 96
--max_packed_tokens 32768 --max_buffer_size 20 --log_freq 1000 --strict_mode False --replacement True
--allow_overflow False --remove_unused_columns False --loss_reduction "square" --seed 42"""
QWEN3, QWEN3_MOE = "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
SFT_SCRIPTS = {
    f"internvl3_5_{group}/{name}": (arch, V3_5_SFT.format(model=model, conv=conv, dpr=dpr, lr=lr, ucfa=ucfa))
    for group, name, arch, model, conv, dpr, lr, ucfa in [
        ("qwen3", "internvl3_5_1b_sft", QWEN3, "OpenGVLab/InternVL3_5-1B-Pretrained", "internvl2_5", 0.0, "8e-5",
         False),
        ("qwen3", "internvl3_5_2b_sft", QWEN3, "OpenGVLab/InternVL3_5-2B-Pretrained", "internvl2_5", 0.0, "8e-5",
         False),
        ("qwen3", "internvl3_5_4b_sft", QWEN3, "OpenGVLab/InternVL3_5-4B-Pretrained", "internvl2_5", 0.0, "8e-5",
         False),
        ("qwen3", "internvl3_5_8b_sft", QWEN3, "OpenGVLab/InternVL3_5-8B-Pretrained", "internvl2_5", 0.1, "8e-5",
         False),
        ("qwen3", "internvl3_5_14b_sft", QWEN3, "OpenGVLab/InternVL3_5-14B-Pretrained", "internvl2_5", 0.1, "8e-5",
         False),
        ("qwen3", "internvl3_5_30b_sft", QWEN3_MOE, "OpenGVLab/InternVL3_5-30B-A3B-Pretrained", "internvl2_5", 0.1,
         "8e-5", False),
        ("qwen3", "internvl3_5_38b_sft", QWEN3, "OpenGVLab/InternVL3_5-38B-Pretrained", "internvl2_5", 0.4, "8e-5",
         False),
        ("qwen3", "internvl3_5_241b_sft", QWEN3_MOE, "OpenGVLab/InternVL3_5-241B-A28B-Pretrained", "internvl2_5",
         0.4, "2e-5", False),
        ("gpt_oss", "internvl3_5_gpt_oss_20b_stage2_sft", "GptOssForCausalLM",
         "work_dirs/internvl3_5_gpt_oss_20b_pretrain/internvl3_5_gpt_oss_20b_stage1_pretrain", "internvl3_5_gpt_oss",
         0.1, "8e-5", True),
    ]
}
AS_LORA = ["--freeze_llm", "True", "--freeze_mlp", "True", "--freeze_backbone", "True", "--use_llm_lora", "16"]
# Scripts whose lists differ only in the model path are one command here (the path becomes the same tiny base of
# their LLM family): each distinct command trains once, named by every script it stands for.
DISTINCT_SFT = {}
for _name, (_arch, _args) in sorted(SFT_SCRIPTS.items()):
    DISTINCT_SFT.setdefault((_arch, re.sub(r'--model_name_or_path "[^"]*"', "", _args)), []).append(_name)


@pytest.mark.parametrize("script", [names[0] for names in DISTINCT_SFT.values()],
                         ids=[" = ".join(names) for names in DISTINCT_SFT.values()])
def test_an_internvl3_5_sft_script_as_lora_trains_packed(script, bases, tmp_path, capsys):
    """Every InternVL3.5 script packs its samples (--use_packed_ds True, square loss reduction): turned into LoRA,
    each trains a tiny base of its LLM family on packed rows and writes a trained adapter."""
    _, meta = bases
    arch, script_args = SFT_SCRIPTS[script]
    conv = shlex.split(script_args)[shlex.split(script_args).index("--conv_style") + 1]
    model = tmp_path / "model"
    build_model(arch, template=conv, vocab_size=len(tiny_tokenizer())).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    out = tmp_path / "out"
    argv = substituted(script_args, str(model), str(meta), str(out))
    assert main(["finetune", *argv, *AS_LORA, "--max_steps", "2", "--use_cpu", "True", "--disable_tqdm", "True"]) == 0
    printed = capsys.readouterr().out
    assert ("packing samples into rows of at most 32,768 tokens and 96 tiles (strict_mode False, replacement True); "
            "loss_reduction square") in printed
    adapter = load_file(out / "llm_adapter" / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for key, tensor in adapter.items() if "lora_B" in key)
