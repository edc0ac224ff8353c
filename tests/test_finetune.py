"""`internvl-lora finetune`, `merge --adapter` and `chat` as real subprocesses on a tiny model and dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from internvl.model.internvl_chat import InternVLChatModel
from internvl.synthetic import write_dataset, write_meta
from tests.builders import build_model


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from internvl.tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("finetune")
    tokenizer = tiny_tokenizer()
    base = root / "base"
    build_model("Qwen2ForCausalLM", template="internvl2_5").save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = write_dataset(root / "data", "shapes", ("colour", "french"), 24, 56, seed=0)
    meta = write_meta(root / "meta.json", {"shapes": data})
    out = root / "run"
    result = cli(
        "finetune", "--model_name_or_path", str(base), "--meta_path", str(meta), "--conv_style", "internvl2_5",
        "--force_image_size", "56", "--max_dynamic_patch", "1", "--dynamic_image_size", "True",
        "--freeze_llm", "True", "--freeze_backbone", "True", "--freeze_mlp", "True", "--use_llm_lora", "4",
        "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", "True", "--output_dir", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, base, out, data


def test_finetune_writes_standard_peft_adapters_tokenizer_manifest_and_loss_curve(trained):
    _, base, out, _ = trained
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        assert (folder / "llm_adapter" / "adapter_config.json").is_file(), folder
        assert (folder / "llm_adapter" / "adapter_model.safetensors").is_file(), folder
        assert (folder / "tokenizer.json").is_file(), folder
    assert not list(out.glob(".staging/*"))
    assert (out / "loss_curve.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"] == str(base) and manifest["lora"]["language_model"]["r"] == 4
    # Plain PEFT loads the adapter onto the base language model.
    llm = InternVLChatModel.from_pretrained(base).language_model
    adapted = PeftModel.from_pretrained(llm, out / "llm_adapter")
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero


def test_merged_model_and_base_plus_adapter_give_the_same_answer(trained):
    root, base, out, data = trained
    image = next((data.parent / "images").glob("*.png"))
    merged = root / "merged"
    result = cli("merge", str(base), str(merged), "--adapter", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((merged / "config.json").read_text())["use_llm_lora"] == 0
    question = "What colour is the shape?"
    from_adapter = cli("chat", str(base), question, "--adapter", str(out), "--image", str(image), "--max-new-tokens", "6")
    from_merged = cli("chat", str(merged), question, "--image", str(image), "--max-new-tokens", "6")
    assert from_adapter.returncode == 0 and from_merged.returncode == 0, from_adapter.stderr[-2000:]
    assert from_adapter.stdout == from_merged.stdout


def test_an_adapter_on_another_base_model_is_refused(trained, tmp_path):
    _, _, out, _ = trained
    other = tmp_path / "other"
    build_model("Qwen2ForCausalLM", template="internvl2_5", downsample_ratio=0.25).save_pretrained(other)
    result = cli("merge", str(other), str(tmp_path / "merged"), "--adapter", str(out))
    assert result.returncode == 2
    assert "config hash" in result.stderr and "--force_base_model" in result.stderr


def test_bad_arguments_give_clear_errors(tmp_path):
    result = cli("finetune", "--model_name_or_path", str(tmp_path / "missing"), "--meta_path", "m.json",
                 "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and "missing: no config.json" in result.stderr
    result = cli("finetune", "--no_such_option", "1", "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and "--no_such_option" in result.stderr


def test_two_processes_end_with_the_same_adapter(trained, tmp_path):
    root, base, _, _ = trained
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "internvl.cli", "finetune",
         "--model_name_or_path", str(base), "--meta_path", str(root / "meta.json"), "--conv_style", "internvl2_5",
         "--force_image_size", "56", "--max_dynamic_patch", "1", "--freeze_llm", "True", "--freeze_backbone", "True",
         "--freeze_mlp", "True", "--use_llm_lora", "4", "--max_steps", "3", "--per_device_train_batch_size", "2",
         "--report_to", "none", "--use_cpu", "True", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "ranks hold identical trainable weights" in line]
    assert sorted(line.split(":")[0] for line in lines) == ["rank 0", "rank 1"]
    assert len({line.split("sha256 ")[1] for line in lines}) == 1
    assert (out / "llm_adapter" / "adapter_model.safetensors").is_file()


def test_a_killed_run_resumes_to_the_same_adapter_as_an_uninterrupted_one(trained, tmp_path):
    import os
    import signal
    import time

    from safetensors.torch import load_file

    root, base, _, _ = trained
    args = ["finetune", "--model_name_or_path", str(base), "--meta_path", str(root / "meta.json"),
            "--conv_style", "internvl2_5", "--force_image_size", "56", "--max_dynamic_patch", "1",
            "--freeze_llm", "True", "--freeze_backbone", "True", "--freeze_mlp", "True", "--use_llm_lora", "4",
            "--max_steps", "60", "--save_steps", "5", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
            "--report_to", "none", "--use_cpu", "True", "--seed", "7", "--dataloader_num_workers", "0"]
    whole = cli(*args, "--output_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "internvl.cli", *args, "--output_dir", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-5").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "llm_adapter").exists(), "the run finished before it could be killed"
    resumed = cli(*args, "--output_dir", str(killed), "--resume_from_checkpoint", str(killed / "checkpoint-5"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = load_file(tmp_path / "whole" / "llm_adapter" / "adapter_model.safetensors")
    actual = load_file(killed / "llm_adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_a_yaml_config_file_holds_the_same_keys_and_flags_override_it(tmp_path):
    from internvl.train.args import parse_finetune_args

    config = tmp_path / "recipe.yaml"
    config.write_text("use_llm_lora: 16\nconv_style: internvl2_5\nlearning_rate: 4.0e-5\nfreeze_llm: true\n")
    model_args, data_args, training_args = parse_finetune_args(
        ["--config", str(config), "--learning_rate", "1e-4", "--warmup_ratio", "0.03", "--output_dir", str(tmp_path)]
    )
    assert (model_args.use_llm_lora, model_args.freeze_llm, data_args.conv_style) == (16, True, "internvl2_5")
    assert training_args.learning_rate == 1e-4
    config.write_text("use_llm_lora: 16\nno_such_key: 1\n")
    with pytest.raises(ValueError, match="unknown option.*no_such_key"):
        parse_finetune_args(["--config", str(config)])


def test_unfreeze_lm_head_really_trains_the_head_and_the_adapter_carries_it(tokenizer):
    from internvl.train.args import DataArguments, ModelArguments
    from internvl.train.finetune import prepare_model

    model = build_model("InternLM2ForCausalLM", template="internvl2_5")
    prepare_model(
        model, tokenizer,
        ModelArguments(freeze_llm=True, freeze_backbone=True, freeze_mlp=True, use_llm_lora=4, unfreeze_lm_head=True),
        DataArguments(conv_style="internvl2_5", force_image_size=56),
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("output.modules_to_save" in n for n in trainable)  # InternLM2's head is `output`
    assert all("lora_" in n or "output.modules_to_save" in n for n in trainable)
    assert model.language_model.peft_config["default"].modules_to_save == ["output"]
