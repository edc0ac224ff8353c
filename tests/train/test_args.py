"""The official arguments as `finetune` reads them: transformers-4 names, the checkpoint's settings as defaults,
`--overwrite_output_dir`, and a model assembled from --vision_path / --llm_path / --mlp_path."""

from __future__ import annotations

import pytest
import torch

from internvl.train.args import parse_finetune_args
from internvl.train.finetune import load_base_model, prepare_model, resume_checkpoint
from tests.builders import build_model


def test_transformers4_names_keep_their_official_meaning():
    _, _, training = parse_finetune_args(["--evaluation_strategy", "no", "--group_by_length", "True",
                                          "--output_dir", "runs/x"])
    assert training.eval_strategy == "no" and training.train_sampling_strategy == "group_by_length"
    _, _, training = parse_finetune_args(["--group_by_length", "False", "--output_dir", "runs/x"])
    assert training.train_sampling_strategy == "random"


def test_do_train_false_is_refused():
    with pytest.raises(ValueError, match="--do_train False: this command trains"):
        parse_finetune_args(["--do_train", "False"])


def test_unset_settings_are_the_checkpoints_and_a_flag_wins(tokenizer):
    model = build_model("Qwen2ForCausalLM", template="internvl2_5", ps_version="v1", select_layer=-2)
    model_args, data_args, _ = parse_finetune_args(["--use_llm_lora", "4", "--max_dynamic_patch", "2"])
    prepare_model(model, tokenizer, model_args, data_args)
    assert (data_args.conv_style, model_args.ps_version, model_args.vision_select_layer) == ("internvl2_5", "v1", -2)
    assert data_args.force_image_size == model.config.image_size == 56
    assert data_args.max_dynamic_patch == model.config.max_dynamic_patch == 2  # the flag, not the checkpoint's 6


def test_overwrite_output_dir_false_refuses_a_folder_holding_something_else_true_never_resumes(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint-3").mkdir()  # would be resumed (and its manifest read) unless overwriting
    refusing, _, training = parse_finetune_args(["--overwrite_output_dir", "False", "--output_dir",
                                                 str(tmp_path / "sub")])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "runs").mkdir()  # our own TensorBoard logs alone: still empty
    assert resume_checkpoint(training, {}, refusing) is None
    (tmp_path / "sub" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty, and holds no checkpoint"):
        resume_checkpoint(training, {}, refusing)
    afresh, _, training = parse_finetune_args(["--overwrite_output_dir", "True", "--output_dir", str(tmp_path)])
    assert resume_checkpoint(training, {}, afresh) is None


def test_a_model_assembled_from_its_parts_holds_their_weights(tmp_path):
    whole = build_model("Qwen2ForCausalLM")
    whole.vision_model.save_pretrained(tmp_path / "vit")
    whole.language_model.save_pretrained(tmp_path / "llm")
    torch.save(whole.mlp1.state_dict(), tmp_path / "mlp.pt")
    model_args, data_args, _ = parse_finetune_args([
        "--vision_path", str(tmp_path / "vit"), "--llm_path", str(tmp_path / "llm"), "--mlp_path",
        str(tmp_path / "mlp.pt"), "--force_image_size", "56", "--conv_style", "internvl2_5"])
    model = load_base_model(model_args, data_args, torch.float32)
    assert model.config.ps_version == "v2" and model.config.max_dynamic_patch == 12  # the official defaults
    expected = whole.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)


def test_an_mlp_path_of_another_shape_is_one_clear_error(tmp_path):
    whole = build_model("Qwen2ForCausalLM")
    whole.vision_model.save_pretrained(tmp_path / "vit")
    whole.language_model.save_pretrained(tmp_path / "llm")
    torch.save({"0.weight": torch.zeros(3)}, tmp_path / "mlp.pt")
    model_args, data_args, _ = parse_finetune_args([
        "--vision_path", str(tmp_path / "vit"), "--llm_path", str(tmp_path / "llm"), "--mlp_path",
        str(tmp_path / "mlp.pt")])
    with pytest.raises(ValueError, match=r"--mlp_path .*mlp\.pt: does not fit this mlp1"):
        load_base_model(model_args, data_args, torch.float32)
