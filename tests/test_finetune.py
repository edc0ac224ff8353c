"""`internvl-lora finetune`, `merge --adapter` and `chat` as real subprocesses on a tiny model and dataset."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from internvl.model.internvl_chat import InternVLChatModel
from internvl.synthetic import write_dataset, write_meta
from tests.builders import build_model
from tests.data.builders import chat, tile_frames, write_frame_folder, write_gif, write_image, write_video
from tests.data.builders import write_dataset as write_lines

VIDEO_QUESTION = chat("What happens?", "colours change")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl.cli", *args], capture_output=True, text=True, timeout=600)


def torchrun(processes: int, *args: str, cpu: bool) -> subprocess.CompletedProcess:
    """`internvl-lora ARGS` in `processes` processes started by torch.distributed.run; GPUs hidden when `cpu`
    (with one visible, accelerate's gloo barrier on rank 1 asks for CUDA device 1)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else None
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "internvl.cli",
         *args, *(["--use_cpu", "True"] if cpu else [])],
        capture_output=True, text=True, timeout=600, env=env,
    )


def assert_trained_adapter(base, out) -> None:
    """`out` holds an LLM adapter that plain PEFT loads onto the base LLM, every LoRA-B trained away from zero
    (PEFT starts B at zero)."""
    llm = InternVLChatModel.from_pretrained(base).language_model
    adapted = PeftModel.from_pretrained(llm, out / "llm_adapter")
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def lora_recipe(root, base) -> list[str]:
    """`finetune` arguments of the official LoRA recipe on the `trained` fixture's tiny model and data."""
    return ["finetune", "--model_name_or_path", str(base), "--meta_path", str(root / "meta.json"), "--conv_style",
            "internvl2_5", "--force_image_size", "56", "--max_dynamic_patch", "1", "--freeze_llm", "True",
            "--freeze_backbone", "True", "--freeze_mlp", "True", "--use_llm_lora", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from internvl.tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("finetune")
    tokenizer = tiny_tokenizer()
    base = root / "base"
    build_model("Qwen2ForCausalLM", template="internvl2_5").save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = write_dataset(root / "data", "shapes", ("colour", "french"), 24, 56, seed=0)
    write_meta(root / "meta.json", {"shapes": data})
    out = root / "run"
    result = cli(
        *lora_recipe(root, base), "--dynamic_image_size", "True", "--max_steps", "4", "--save_steps", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--save_full_model", "True", "--use_cpu", "True", "--output_dir", str(out), "--drop_path_rate", "0.1",
    )  # no --report_to: TensorBoard by default; the official recipe's drop_path_rate, which the base config lacks
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "finetune.log").write_text(result.stdout + result.stderr)
    return root, base, out, data


def test_finetune_writes_standard_peft_adapters_tokenizer_manifest_and_loss_curve(trained):
    _, base, out, _ = trained
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        assert (folder / "llm_adapter" / "adapter_config.json").is_file(), folder
        assert (folder / "llm_adapter" / "adapter_model.safetensors").is_file(), folder
        assert (folder / "tokenizer.json").is_file(), folder
    assert not (out / ".staging").exists()  # emptied and removed after each checkpoint
    assert (out / "loss_curve.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"] == str(base) and manifest["lora"]["language_model"]["r"] == 4
    assert_trained_adapter(base, out)


def test_finetune_logs_the_training_loss_to_tensorboard_by_default(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out, _ = trained
    (run,) = {path.parent for path in out.glob("runs/*/events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    history = json.loads((out / "loss_history.json").read_text())
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [value for _, value in logged] == pytest.approx([loss for _, loss in history])


def test_report_to_is_tensorboard_unless_the_command_line_or_config_file_says_otherwise(tmp_path):
    from internvl.train.args import parse_finetune_args

    def report_to(*argv: str) -> list[str]:
        return parse_finetune_args([*argv, "--output_dir", str(tmp_path)])[2].report_to

    config = tmp_path / "recipe.yaml"
    config.write_text("report_to: none\n")
    assert report_to() == ["tensorboard"]
    assert report_to("--report_to", "none") == []
    assert report_to("--config", str(config)) == []
    assert report_to("--config", str(config), "--report_to", "tensorboard") == ["tensorboard"]


def test_save_full_model_writes_the_merged_model_in_the_official_format(trained, tokenizer):
    from safetensors import safe_open

    from internvl.train.outputs import load_adapter
    from tests.builders import build_batch

    _, base, out, _ = trained
    full = out / "full_model"
    config, base_config = (json.loads((folder / "config.json").read_text()) for folder in (full, base))
    assert config["use_llm_lora"] == 0
    assert config["llm_config"]["use_cache"] == base_config["llm_config"]["use_cache"] is True  # not training's
    assert (full / "tokenizer.json").is_file()

    def weight_names(folder) -> set[str]:
        with safe_open(folder / "model.safetensors", "pt") as weights:
            return set(weights.keys())

    assert weight_names(full) == weight_names(base)  # official names: no PEFT prefixes, no lora_ weights
    merged, adapted, original = (InternVLChatModel.from_pretrained(folder) for folder in (full, base, base))
    load_adapter(adapted, out)
    batch = build_batch(adapted, tokenizer)  # also sets adapted.img_context_token_id
    batch.pop("labels")
    merged.img_context_token_id = original.img_context_token_id = adapted.img_context_token_id
    with torch.no_grad():
        logits = {name: model(**batch).logits for name, model in
                  [("merged", merged), ("adapted", adapted), ("base", original)]}
    torch.testing.assert_close(logits["merged"], logits["adapted"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["merged"], logits["base"], atol=1e-3)  # the training is in the weights


def test_merged_model_and_base_plus_adapter_give_the_same_answer(trained):
    root, base, out, data = trained
    image = next((data.parent / "images").glob("*.png"))
    merged = root / "merged"
    result = cli("merge", str(base), str(merged), "--adapter", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((merged / "config.json").read_text())["use_llm_lora"] == 0
    question = "What colour is the shape?"
    from_adapter = cli("chat", str(base), question, "--adapter", str(out), "--image", str(image),
                       "--max-new-tokens", "6")
    from_merged = cli("chat", str(merged), question, "--image", str(image), "--max-new-tokens", "6")
    assert from_adapter.returncode == 0 and from_merged.returncode == 0, from_adapter.stderr[-2000:]
    assert from_adapter.stdout == from_merged.stdout


@pytest.fixture(scope="module")
def video_run(trained):
    """A LoRA run from the CLI on one dataset of video (MP4, MP4 clip, GIF, frame folder), image and text lines,
    all eight in each batch."""
    root, base, _, _ = trained
    data = root / "video_data"
    write_video(data / "v.mp4")
    write_gif(data / "v.gif")
    write_frame_folder(data / "frames")
    write_image(data / "a.png", 56, 56)
    videos = [{"video": "v.mp4"}, {"video": "v.mp4", "clip": [0.5, 1.5]}, {"video": "v.gif"}, {"video": "frames"}]
    lines = [*({**video, "conversations": chat("What happens?", "red rises")} for video in videos),
             *[{"image": "a.png", "conversations": chat("What is it?", "a line")}] * 2,
             *[{"conversations": chat("What happens?", "nothing")}] * 2]
    meta = write_lines(data, lines)
    out = root / "video_run"
    result = cli(*lora_recipe(root, base), "--meta_path", str(meta), "--min_num_frame", "2", "--max_num_frame", "4",
                 "--max_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
                 "--logging_steps", "1", "--report_to", "none", "--use_cpu", "True", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return base, out, data


def test_video_image_and_text_lines_train_together_into_an_adapter(video_run):
    base, out, _ = video_run
    assert_trained_adapter(base, out)
    assert len(json.loads((out / "loss_history.json").read_text())) == 2


def test_chat_about_a_video_answers_as_the_model_cards_call(video_run):
    from internvl.data.tokenizer import load_tokenizer
    from internvl.data.video import load_video, video_prefix
    from internvl.train.outputs import load_adapter

    base, out, data = video_run
    result = cli("chat", str(base), "What happens?", "--adapter", str(out), "--video", str(data / "v.mp4"),
                 "--num_segments", "4", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr[-2000:]
    model = InternVLChatModel.from_pretrained(base).eval()
    load_adapter(model, out)
    pixel_values, counts = load_video(data / "v.mp4", num_segments=4, input_size=56)
    answer = model.chat(load_tokenizer(out), pixel_values, video_prefix(4) + "What happens?",
                        dict(max_new_tokens=6, do_sample=False), num_patches_list=counts)
    assert result.stdout == answer + "\n"


def test_chat_about_a_missing_video_is_one_error_line(trained, tmp_path):
    _, base, _, _ = trained
    result = cli("chat", str(base), "What happens?", "--video", str(tmp_path / "gone.mp4"))
    assert (result.returncode, result.stderr) == (2, f"internvl-lora chat: error: missing video: {tmp_path}/gone.mp4\n")


def test_each_epoch_trains_on_frames_drawn_anew_the_same_as_the_dataset_draws(tokenizer, tmp_path):
    """Through the Trainer and two DataLoader workers kept across epochs: the frames the model sees in epoch e are
    the dataset's own draw for (seed, e, index)."""
    from internvl.data.dataset import InternVLDataset, SampleBuilder
    from internvl.train.args import parse_finetune_args
    from internvl.train.finetune import finetune

    write_video(tmp_path / "v.mp4")
    meta = write_lines(tmp_path, [{"video": "v.mp4", "conversations": VIDEO_QUESTION}])
    model = build_model("Qwen2ForCausalLM", template="internvl2_5")
    seen = []
    model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tile_frames(kwargs["pixel_values"])), with_kwargs=True)
    model_args, data_args, training_args = parse_finetune_args([
        "--meta_path", str(meta), "--conv_style", "internvl2_5", "--force_image_size", "56", "--freeze_llm", "True",
        "--freeze_backbone", "True", "--use_llm_lora", "4", "--min_num_frame", "3", "--max_num_frame", "6",
        "--num_train_epochs", "3", "--per_device_train_batch_size", "1", "--dataloader_num_workers", "2",
        "--dataloader_persistent_workers", "True", "--seed", "7", "--report_to", "none", "--use_cpu", "True",
        "--save_strategy", "no", "--output_dir", str(tmp_path / "out")])
    finetune(model_args, data_args, training_args, model=model, tokenizer=tokenizer)
    builder = SampleBuilder(tokenizer, "internvl2_5", model.num_image_token, image_size=56, min_num_frame=3,
                            max_num_frame=6)
    dataset = InternVLDataset(meta, builder, seed=7)
    drawn = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        drawn.append(tile_frames(dataset[0]["pixel_values"]))
    assert seen == drawn and len({tuple(frames) for frames in drawn}) == 3


def test_an_adapter_on_another_base_model_is_refused(trained, tmp_path):
    _, _, out, _ = trained
    other = tmp_path / "other"
    build_model("Qwen2ForCausalLM", template="internvl2_5", downsample_ratio=0.25).save_pretrained(other)
    result = cli("merge", str(other), str(tmp_path / "merged"), "--adapter", str(out))
    assert result.returncode == 2
    assert "config hash" in result.stderr and "--force_base_model" in result.stderr


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        pytest.param(["--model_name_or_path", "{tmp}/missing"], "--model_name_or_path {tmp}/missing: no such folder",
                     id="missing model"),
        pytest.param(["--config", "{tmp}/bad.yaml"], "{tmp}/bad.yaml:2: not valid YAML: expected ',' or ']'",
                     id="malformed YAML config"),
    ],
)
def test_a_bad_argument_ends_the_process_with_one_clear_error_line(tmp_path, argv, error):
    (tmp_path / "bad.yaml").write_text("use_llm_lora: [4\n")
    result = cli("finetune", *[arg.format(tmp=tmp_path) for arg in argv], "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"internvl-lora finetune: error: {error.format(tmp=tmp_path)}")


def _write_bad_data(folder, images) -> None:
    """Meta files with one problem each, named by the cases of the test below."""
    good = {"image": "00000.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                  {"from": "gpt", "value": "red"}]}
    lines = {
        "not_json": [json.dumps(good), '{"image": "00000.png", "conversations": [}'],
        "no_image": [json.dumps(good), json.dumps({**good, "image": "gone.png"})],
        "empty": [],  # a 0-byte file
        "all_bad": [json.dumps({**good, "image": "gone.png"}), '{"conversations": [}'],
        "too_long": [json.dumps({**good, "conversations": [good["conversations"][0],
                                                           {"from": "gpt", "value": "red " * 25_000}]})],
        "no_video": [json.dumps(good), json.dumps({"video": "gone.mp4", "conversations": VIDEO_QUESTION})],
        "bad_video": [json.dumps(good), json.dumps({"video": str(folder / "notes.mp4"),  # outside the shared root
                                                    "conversations": VIDEO_QUESTION})],
    }
    (folder / "notes.mp4").write_text("not a video\n")
    for name, records in lines.items():
        (folder / f"{name}.jsonl").write_text("".join(record + "\n" for record in records))
    for name in (*lines, "no_jsonl"):
        meta = {name: {"root": str(images), "annotation": str(folder / f"{name}.jsonl")}}
        (folder / f"{name}.json").write_text(json.dumps(meta))
    entry = {"root": str(images), "annotation": str(folder / "no_image.jsonl")}
    (folder / "cut.json").write_text(json.dumps({"cut": {**entry, "repeat_time": 0.1}}))  # int(2 lines * 0.1) = 0
    (folder / "twice.json").write_text(f'{{"twice": {json.dumps(entry)}, "twice": {json.dumps(entry)}}}')
    (folder / "no_datasets.json").write_text("{}")
    (folder / "config.yaml").write_text("- use_llm_lora\n")
    (folder / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        pytest.param(["--no_such_option", "1"], "unknown argument(s): --no_such_option 1", id="unknown flag"),
        pytest.param(["--meta_path", "{tmp}/none.json"], "--meta_path {tmp}/none.json: no such file",
                     id="missing meta file"),
        pytest.param(["--eval_meta_path", "{tmp}/none.json"], "--eval_meta_path {tmp}/none.json: no such file",
                     id="missing eval meta file"),
        pytest.param(["--meta_path", "{tmp}/no_jsonl.json"],
                     "{tmp}/no_jsonl.json: dataset 'no_jsonl': annotation file {tmp}/no_jsonl.jsonl not found",
                     id="missing JSONL"),
        pytest.param(["--meta_path", "{tmp}/not_json.json"], "{tmp}/not_json.jsonl:2: malformed JSON: Expecting value",
                     id="line not JSON"),
        pytest.param(["--meta_path", "{tmp}/no_image.json"], "{tmp}/no_image.jsonl:2: missing image: {images}/gone.png",
                     id="missing image"),
        pytest.param(["--meta_path", "{tmp}/empty.json"],
                     "{tmp}/empty.json: empty dataset: 'empty' ({tmp}/empty.jsonl) has no records", id="empty JSONL"),
        pytest.param(["--meta_path", "{tmp}/cut.json"],
                     "{tmp}/cut.json: empty dataset: 'cut' ({tmp}/no_image.jsonl): repeat_time 0.1 keeps none of its 2",
                     id="repeat_time keeps no line"),
        pytest.param(["--meta_path", "{tmp}/no_datasets.json"], "{tmp}/no_datasets.json: names no datasets",
                     id="meta without datasets"),
        pytest.param(["--meta_path", "{tmp}/twice.json"],
                     "{tmp}/twice.json: 'twice' appears twice in one object; JSON would keep only the last",
                     id="dataset named twice"),
        pytest.param(["--meta_path", "{tmp}/all_bad.json", "--skip_bad_samples", "True"],
                     "{tmp}/all_bad.json: nothing to train on: all 2 annotation lines are bad (malformed JSON: 1, "
                     "missing image: 1); the first: {tmp}/all_bad.jsonl:1: missing image", id="every sample bad"),
        pytest.param(["--meta_path", "{tmp}/too_long.json", "--max_seq_length", "256"],
                     "{tmp}/too_long.jsonl:1: sample too long: 100014 bytes of text make at least 575 tokens",
                     id="sample far over the limit"),
        pytest.param(["--meta_path", "{tmp}/no_video.json"],
                     "{tmp}/no_video.jsonl:2: missing video: {images}/gone.mp4", id="missing video"),
        pytest.param(["--meta_path", "{tmp}/bad_video.json"],
                     "{tmp}/bad_video.jsonl:2: unreadable video: {tmp}/notes.mp4: Invalid data found when processing "
                     "input", id="unreadable video"),
        pytest.param(["--max_seq_length", "0"], "--max_seq_length 0: must be a positive number of tokens",
                     id="no tokens"),
        pytest.param(["--min_num_frame", "0"], "--min_num_frame 0: must be a positive number of frames",
                     id="no frames"),
        pytest.param(["--max_num_frame", "4"], "--max_num_frame 4: must be at least --min_num_frame (8)",
                     id="fewer frames at most than at least"),
        pytest.param(["--force_image_size", "-56"], "--force_image_size -56: must be a positive number of pixels",
                     id="negative image size"),
        pytest.param(["--min_dynamic_patch", "0"], "--min_dynamic_patch 0: must be a positive number of tiles",
                     id="no tiles"),
        pytest.param(["--min_dynamic_patch", "4"], "--max_dynamic_patch 1: must be at least --min_dynamic_patch (4)",
                     id="fewer tiles at most than at least"),
        pytest.param(["--down_sample_ratio", "2"], "--down_sample_ratio 2.0: must be in (0, 1]",
                     id="down-sampling that enlarges"),
        pytest.param(["--conv_style", "vicuna"],
                     "--conv_style 'vicuna': unknown conversation template; known: internvl2_5", id="unknown template"),
        pytest.param(["--use_llm_lora", "-4"],
                     "--use_llm_lora -4: must be a LoRA rank (a positive integer), or 0 for no LoRA",
                     id="negative rank"),
        pytest.param(["--use_llm_lora", "four"], "argument --use_llm_lora/--use-llm-lora: invalid int value: 'four'",
                     id="rank not a number"),
        pytest.param(["--resume_from_checkpoint", "{tmp}/checkpoint-9"],
                     "--resume_from_checkpoint {tmp}/checkpoint-9: no such folder", id="missing checkpoint"),
        pytest.param(["--use_llm_lora", "0"],
                     "nothing to train: --freeze_llm, --freeze_backbone and --freeze_mlp freeze every weight",
                     id="nothing trainable"),
        pytest.param(["--config", "{tmp}/none.yaml"], "--config {tmp}/none.yaml: No such file or directory",
                     id="missing config"),
        pytest.param(["--config", "{tmp}/config.yaml"],
                     "{tmp}/config.yaml: expected a mapping of option names to values", id="config not a mapping"),
        pytest.param(["--fsdp", "full_shard"], "Using fsdp only works in distributed training",
                     id="FSDP in one process"),
        pytest.param(["--deepspeed", "{tmp}/none.json"],
                     "--deepspeed {tmp}/none.json: no such file, and not one of the official configs the package "
                     "holds (zero_stage1_config.json, ", id="DeepSpeed config missing"),
        pytest.param(["--deepspeed", "{tmp}/ds.json"], "The 'deepspeed>=0.9.3' distribution was not found",
                     id="DeepSpeed not installed",
                     marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None,
                                              reason="deepspeed is installed")),
    ],
)
def test_a_bad_input_gives_one_clear_error_naming_it(trained, tmp_path, capsys, argv, error):
    from internvl.cli import main

    root, base, _, data = trained
    images = data.parent / "images"
    _write_bad_data(tmp_path, images)
    common = [*lora_recipe(root, base), "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to",
              "none", "--disable_tqdm", "True", "--use_cpu", "True", "--output_dir", str(tmp_path / "out")]
    try:
        status = main([*common, *[arg.format(tmp=tmp_path) for arg in argv]])  # the last flag wins
    except SystemExit as exit:  # argparse's own errors (a value of the wrong type)
        status = exit.code
    assert status == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].startswith(f"internvl-lora finetune: error: {error.format(tmp=tmp_path, images=images)}")


PACKED = ["--use_packed_ds", "True", "--max_packed_tokens", "300", "--num_images_expected", "6", "--strict_mode",
          "False", "--replacement", "True", "--max_buffer_size", "4", "--loss_reduction", "square"]


def test_fsdp_on_the_cpu_is_refused_rather_than_silently_trained_as_ddp(trained, tmp_path):
    root, base, _, _ = trained
    result = torchrun(2, *lora_recipe(root, base), "--max_steps", "1", "--fsdp", "full_shard auto_wrap",
                      "--report_to", "none", "--output_dir", str(tmp_path), cpu=True)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("internvl-lora finetune: error:")]
    assert len(errors) == 2  # one per rank
    assert all("--fsdp: accelerate does not apply FSDP to this MULTI_CPU run" in line for line in errors)


@pytest.mark.parametrize("packing", [[], PACKED], ids=["padded", "packed"])
def test_two_processes_end_with_the_same_adapter(trained, tmp_path, packing):
    """DDP on the CPU; packed, each rank reads its own share of the samples and the loss divisor (square
    reduction's weights) is summed over both."""
    root, base, _, _ = trained
    out = tmp_path / "ddp"
    result = torchrun(2, *lora_recipe(root, base), *packing, "--max_steps", "3", "--per_device_train_batch_size",
                      "2", "--report_to", "none", "--output_dir", str(out), cpu=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_both_ranks_agree(result.stdout)
    assert (out / "llm_adapter" / "adapter_model.safetensors").is_file()


def assert_both_ranks_agree(stdout: str) -> None:
    """Both ranks of a 2-process run reported the same digest of their trainable weights."""
    # Searched in the whole output: the two ranks' prints may interleave within a line.
    reports = re.findall(r"rank (\d): all 2 ranks hold identical trainable weights \(sha256 (\w+)\)", stdout)
    assert sorted(rank for rank, _ in reports) == ["0", "1"]
    assert len({digest for _, digest in reports}) == 1


def test_a_killed_run_resumes_to_the_same_adapter_as_an_uninterrupted_one(trained, tmp_path):
    import signal
    import time

    from safetensors.torch import load_file

    root, base, _, _ = trained
    args = [*lora_recipe(root, base), "--max_steps", "60", "--save_steps", "5", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "True", "--seed", "7",
            "--dataloader_num_workers", "0"]
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
    last = max(int(folder.name.split("-")[1]) for folder in killed.glob("checkpoint-*"))
    stale = killed / ".staging" / f"checkpoint-{last + 5}"  # the next save, as if killed while writing it
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "stale.bin").write_bytes(b"half-written")
    resumed = cli(*args, "--output_dir", str(killed))  # the same command again, as the official script resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {killed / f'checkpoint-{last}'}, the last checkpoint in --output_dir" in resumed.stdout
    assert (killed / f"checkpoint-{last + 5}").is_dir()
    assert not (killed / f"checkpoint-{last + 5}" / "stale.bin").exists()

    expected = load_file(tmp_path / "whole" / "llm_adapter" / "adapter_model.safetensors")
    actual = load_file(killed / "llm_adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_a_packed_run_resumed_from_a_checkpoint_ends_with_the_uninterrupted_runs_adapter(trained, tmp_path):
    """--use_packed_ds with two loader workers: the stream of packs depends only on the seed and the workers, and
    the Trainer skips what a checkpoint has trained on, so a run killed after checkpoint-3 and run again (its
    output folder holding only that checkpoint) ends with the adapter of the run that was never stopped."""
    from safetensors.torch import load_file

    root, base, _, _ = trained
    args = [*lora_recipe(root, base), *PACKED, "--max_steps", "6", "--save_steps", "3",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu",
            "True", "--seed", "5", "--dataloader_num_workers", "2", "--logging_steps", "1"]
    whole = cli(*args, "--output_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "Fast LoRA off" in whole.stderr and "error" not in whole.stdout
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", killed / "checkpoint-3")
    resumed = cli(*args, "--output_dir", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {killed / 'checkpoint-3'}" in resumed.stdout
    expected = load_file(tmp_path / "whole" / "llm_adapter" / "adapter_model.safetensors")
    actual = load_file(killed / "llm_adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert_trained_adapter(base, killed)


def test_a_packed_run_needs_max_steps_in_one_line(trained, tmp_path):
    root, base, _, _ = trained
    result = cli(*lora_recipe(root, base), *PACKED, "--use_cpu", "True", "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "internvl-lora finetune: error: --use_packed_ds True: packs stream without a length (as officially): give "
        "--max_steps, the number of optimizer steps to train")


def _adapter_bytes(folder) -> bytes:
    return (folder / "llm_adapter" / "adapter_model.safetensors").read_bytes()


def test_a_finished_run_run_again_trains_nothing_and_more_steps_train_on(trained, tmp_path):
    root, base, _, _ = trained
    out = tmp_path / "run"
    # A constant schedule: a step more would change the adapter (a decayed one has no learning rate left).
    args = [*lora_recipe(root, base), "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2",
            "--lr_scheduler_type", "constant", "--report_to", "none", "--use_cpu", "True", "--output_dir", str(out)]
    first = cli(*args)  # --logging_steps (500) longer than the run: no step is logged
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "loss_curve.png").is_file()
    assert [step for step, _ in json.loads((out / "loss_history.json").read_text())] == [2]  # the run's mean loss
    adapter = _adapter_bytes(out)

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{out}: the run already finished at step 2; nothing to train" in again.stdout
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert _adapter_bytes(out) == adapter

    longer = cli(*[arg if arg != "2" else "3" for arg in args])  # --max_steps 3
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in longer.stdout
    assert (out / "checkpoint-3").is_dir() and _adapter_bytes(out) != adapter


def test_a_finished_run_without_checkpoints_run_again_trains_nothing_and_never_retrains(trained, tmp_path):
    root, base, _, _ = trained
    out = tmp_path / "run"
    # The official defaults besides the LLM's LoRA: the ViT and the projector train fully; the summary says so.
    args = [*lora_recipe(root, base), "--freeze_backbone", "False", "--freeze_mlp", "False", "--max_steps", "2",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--output_dir", str(out)]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    vit = sum(p.numel() for p in InternVLChatModel.from_pretrained(base).vision_model.parameters())
    assert f"vision_model fully ({vit:,}: --freeze_backbone True freezes it)" in first.stdout
    assert re.search(r"mlp1 fully \([\d,]+: --freeze_mlp True freezes it\); language_model LoRA r=4", first.stdout)
    adapter = _adapter_bytes(out)

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the run already finished at step 2; nothing to train" in again.stdout
    assert _adapter_bytes(out) == adapter

    longer = cli(*[arg if arg != "2" else "3" for arg in args])
    assert longer.returncode == 2
    assert longer.stderr.strip().splitlines()[-1] == (
        f"internvl-lora finetune: error: --output_dir {out}: holds a finished run of 2 steps and no checkpoint-N to "
        "continue it to 3 steps (it was saved with --save_strategy no); pass another --output_dir")
    assert _adapter_bytes(out) == adapter


def test_ctrl_c_leaves_intact_checkpoints_and_one_line_naming_the_last_and_how_to_resume(trained, tmp_path):
    import signal
    import time

    root, base, _, _ = trained
    out = tmp_path / "run"
    args = [*lora_recipe(root, base), "--max_steps", "60", "--save_steps", "5", "--report_to", "none",
            "--use_cpu", "True", "--disable_tqdm", "True", "--output_dir", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "internvl.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-5").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert not (out / "llm_adapter").exists(), "the run finished before it could be interrupted"
    assert "Traceback" not in stderr
    last = max((path for path in out.glob("checkpoint-*")), key=lambda path: int(path.name.split("-")[1]))
    assert stderr.strip().splitlines()[-1] == (
        f"internvl-lora finetune: interrupted; the last complete checkpoint is {last}: run the same command again to "
        "resume from it")
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {last}" in resumed.stdout
    assert (out / "checkpoint-60").is_dir() and not (out / "checkpoint-61").exists()


def test_an_output_dir_that_is_a_file_is_refused_and_kept(trained, tmp_path):
    root, base, _, _ = trained
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    result = cli(*lora_recipe(root, base), "--use_cpu", "True", "--output_dir", str(target))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"internvl-lora finetune: error: --output_dir {target}: is a file, not a folder; pass a folder to write to")
    assert target.read_text() == "mine"


def test_resuming_from_a_checkpoint_of_another_base_model_is_refused_before_training(trained, tokenizer, tmp_path):
    root, _, out, _ = trained
    other = tmp_path / "other"
    build_model("Qwen2ForCausalLM", template="internvl2_5", downsample_ratio=0.25).save_pretrained(other)
    tokenizer.save_pretrained(other)
    result = cli(*lora_recipe(root, other), "--resume_from_checkpoint", str(out / "checkpoint-2"), "--use_cpu",
                 "True", "--report_to", "none", "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert f"{out / 'checkpoint-2'}: these adapters were trained on base model" in result.stderr
    assert not (tmp_path / "run").exists()  # the Trainer, which makes the output folder, was never built


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


@pytest.mark.parametrize("arch, dropout", [("Qwen3MoeForCausalLM", 0.0), ("Qwen2ForCausalLM", 0.05)])
def test_the_official_recipe_wraps_every_llm_with_the_dropout_peft_allows_it(tokenizer, arch, dropout):
    from internvl.train.args import DataArguments, ModelArguments
    from internvl.train.finetune import prepare_model

    model = build_model(arch, template="internvl2_5")
    prepare_model(model, tokenizer, ModelArguments(freeze_llm=True, freeze_backbone=True, use_llm_lora=4),
                  DataArguments(conv_style="internvl2_5", force_image_size=56))
    assert model.language_model.peft_config["default"].lora_dropout == dropout


def test_outputs_written_from_a_gathered_state_dict_equal_those_written_from_the_model(tokenizer, tmp_path):
    """FSDP and DeepSpeed ZeRO-3 leave each rank a shard of every weight; `_save` gets them gathered: the whole
    model's (FSDP) or the trainable ones (our ZeRO-3 save); one lacking a trainable weight is refused."""
    from safetensors.torch import load_file

    from internvl.train.args import DataArguments, ModelArguments
    from internvl.train.finetune import prepare_model
    from internvl.train.outputs import TRAINED_WEIGHTS, save_outputs

    model = build_model("Qwen2ForCausalLM", template="internvl2_5")
    base_config = model.config.to_dict()
    prepare_model(model, tokenizer, ModelArguments(freeze_llm=True, freeze_backbone=True, use_llm_lora=4),
                  DataArguments(conv_style="internvl2_5", force_image_size=56))  # trains LoRA and the projector
    trainable = [param for param in model.parameters() if param.requires_grad]
    with torch.no_grad():
        for param in trainable:
            param.add_(torch.randn_like(param))  # as if trained: LoRA B starts at zero
    save_outputs(model, tmp_path / "from_model", base_config, None)
    whole = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    only_trainable = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    with torch.no_grad():
        for param in trainable:
            param.zero_()  # what this rank holds no longer matters
    save_outputs(model, tmp_path / "from_whole", base_config, None, state_dict=whole)
    save_outputs(model, tmp_path / "from_trainable", base_config, None, state_dict=only_trainable)

    for file in ("llm_adapter/adapter_model.safetensors", TRAINED_WEIGHTS):
        expected = load_file(tmp_path / "from_model" / file)
        assert expected
        for folder in ("from_whole", "from_trainable"):
            actual = load_file(tmp_path / folder / file)
            assert expected.keys() == actual.keys()
            for key in expected:
                assert torch.equal(expected[key], actual[key]), (folder, key)
    first = next(iter(only_trainable))
    with pytest.raises(ValueError, match=f"the gathered weights lack {len(trainable)} trainable weights .first: "
                                         f"{re.escape(first)}"):
        save_outputs(model, tmp_path / "from_nothing", base_config, None, state_dict={})
    assert not (tmp_path / "from_nothing").exists()


def test_on_the_cpu_a_run_reports_its_trainable_share_and_why_it_trains_through_peft(trained):
    log = (trained[0] / "finetune.log").read_text()
    assert re.search(r"trainable: [\d,]+ of [\d,]+ parameters \(\d+\.\d{3}%\)", log)
    assert "Fast LoRA off, training runs PEFT's own layers: parameters are on cpu" in log
    assert "fused fast path" not in log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path runs on CUDA")
def test_on_cuda_the_llm_lora_trains_on_the_fused_path_into_a_standard_adapter(trained, tmp_path):
    root, base, _, _ = trained
    out = tmp_path / "cuda"
    result = cli(*lora_recipe(root, base), "--bf16", "True", "--max_steps", "3", "--learning_rate", "1e-2",
                 "--report_to", "none", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LLM LoRA on the fused fast path" in result.stdout
    assert re.search(r"LLM layers: \d+ kept, \d+ MLP-recomputed, the rest checkpointed \(budget \d+\.\d\d GiB: "
                     r"HF \+ PEFT's, all checkpointed, on \d+ rows? of [\d,]+ tokens and \d+ tiles each; the engine "
                     r"takes \d+\.\d\d GiB during a step and \d+\.\d\d GiB for the optimizer\)", result.stdout), \
        [line for line in result.stdout.splitlines() if "LLM layers" in line]
    assert_trained_adapter(base, out)


def _zero_config(stage: int, gather: bool = True) -> dict:
    """A DeepSpeed config of ZeRO `stage`, its sizes left to the Trainer ("auto") as in the official configs."""
    zero = {"stage": stage, **({"stage3_gather_16bit_weights_on_model_save": gather} if stage == 3 else {})}
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


_NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
# (engine, whether the LLM's LoRA trains on the fused path under it): None is FSDP; a name is an official config
# file the package holds a copy of (none in the working directory), as the official scripts pass it.
_ENGINES = [
    pytest.param(None, False, id="FSDP"),
    pytest.param("zero_stage1_config.json", True, id="official-ZeRO-1", marks=_NEEDS_DEEPSPEED),
    *[pytest.param(_zero_config(*setting), fused, id=name, marks=_NEEDS_DEEPSPEED)
      for name, setting, fused in [("ZeRO-2", (2,), True), ("ZeRO-3", (3,), False),
                                   ("ZeRO-3-no-gather", (3, False), False)]],
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate applies FSDP and DeepSpeed to GPU runs only")
@pytest.mark.parametrize(("deepspeed", "fused"), _ENGINES)
def test_a_sharded_run_on_a_gpu_writes_standard_adapters_and_resumes(trained, tmp_path, deepspeed, fused):
    """FSDP (`deepspeed` None) or DeepSpeed with that config: train (on the fused path where the engine keeps whole
    weights), save adapters, rerun to resume."""
    root, base, _, _ = trained
    engine = ["--fsdp", "full_shard auto_wrap"]
    if isinstance(deepspeed, str):
        engine = ["--deepspeed", deepspeed]
    elif deepspeed is not None:
        (tmp_path / "ds.json").write_text(json.dumps(deepspeed))
        engine = ["--deepspeed", str(tmp_path / "ds.json")]
    out = tmp_path / "run"
    args = [*lora_recipe(root, base), *engine, "--bf16", "True", "--save_steps", "1", "--learning_rate", "1e-2",
            "--report_to", "none", "--output_dir", str(out)]
    first = torchrun(1, *args, "--max_steps", "2", cpu=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert ("LLM LoRA on the fused fast path" in first.stdout) == fused
    if not fused:
        assert "Fast LoRA off, training runs PEFT's own layers:" in first.stderr
    if isinstance(deepspeed, str):
        assert f"using internvl-lora's copy of the official {deepspeed}" in first.stdout
    assert (out / "checkpoint-1" / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert_trained_adapter(base, out)
    resumed = torchrun(1, *args, "--max_steps", "3", cpu=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in resumed.stdout
    assert (out / "checkpoint-3").is_dir()
    assert_trained_adapter(base, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path and FlexAttention run on CUDA")
@_NEEDS_DEEPSPEED
def test_a_packed_run_under_the_official_zero1_config_trains_on_the_fused_path_and_resumes(trained, tmp_path):
    """The InternVL3.5 recipe's packing options, as LoRA, under the official ZeRO-1 config: packed rows through
    the fused path, the checkpoint plan fitted to the largest pack, saved and resumed."""
    root, base, _, _ = trained
    out = tmp_path / "run"
    args = [*lora_recipe(root, base), *PACKED, "--deepspeed", "zero_stage1_config.json", "--bf16", "True",
            "--grad_checkpoint", "True", "--save_steps", "2", "--learning_rate", "1e-2", "--report_to", "none",
            "--per_device_train_batch_size", "2", "--output_dir", str(out)]
    first = torchrun(1, *args, "--max_steps", "2", cpu=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "LLM LoRA on the fused fast path" in first.stdout
    # The official config's two reduce buckets of 1e9 bf16 elements (3.73 GiB) shrink to the trainable weights' size;
    # what DeepSpeed's backward still allocates, where the plan's probe steps never look, is measured on the first
    # step and left out of the plan's budget.
    assert "DeepSpeed: reduce_bucket_size 1,000,000,000 -> " in first.stdout
    assert re.search(r"HF \+ PEFT's, all checkpointed, on 1 packed row of 600 tokens and 12 tiles; the engine takes "
                     r"\d+\.\d\d GiB during a step and \d+\.\d\d GiB for the optimizer\)", first.stdout), first.stdout
    resumed = torchrun(1, *args, "--max_steps", "4", cpu=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in resumed.stdout
    assert_trained_adapter(base, out)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("engine", [
    pytest.param("DDP"), pytest.param("FSDP"),
    pytest.param("ZeRO-3", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                    reason="needs deepspeed")),
])
def test_two_gpus_train_one_standard_adapter(trained, tmp_path, engine):
    root, base, _, _ = trained
    (tmp_path / "zero3.json").write_text(json.dumps(_zero_config(3, gather=False)))
    flags = {"DDP": [], "FSDP": ["--fsdp", "full_shard auto_wrap"],
             "ZeRO-3": ["--deepspeed", str(tmp_path / "zero3.json")]}
    out = tmp_path / "run"
    result = torchrun(2, *lora_recipe(root, base), *flags[engine], "--bf16", "True", "--max_steps", "3",
                      "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none",
                      "--output_dir", str(out), cpu=False)
    assert result.returncode == 0, result.stderr[-3000:]
    if engine == "DDP":  # every rank holds the whole adapter, trained on the fused path
        assert "LLM LoRA on the fused fast path" in result.stdout
        assert_both_ranks_agree(result.stdout)
    assert_trained_adapter(base, out)
