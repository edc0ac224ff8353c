"""`--deepspeed` as the official scripts pass it: official names without the file, and no JIT build of DeepSpeed's ops."""

from __future__ import annotations

import copy
import json
import re

import pytest

from internvl.train.deepspeed_config import (
    OFFICIAL_CONFIGS,
    avoid_op_builds,
    fit_reduce_buckets,
    official_config_names,
    resolve_deepspeed_argument,
)


def test_the_package_holds_every_official_config_with_its_zero_stage():
    names = official_config_names()
    assert {"zero_stage1_config.json", "zero_stage2_config.json", "zero_stage3_config.json",
            "zero_stage3_config_34b.json", "zero_stage3_config_100b.json"} <= set(names)
    for name in names:
        config = json.loads((OFFICIAL_CONFIGS / name).read_text())
        assert config["zero_optimization"]["stage"] == int(re.match(r"zero_stage(\d)", name)[1]), name
        assert config["bf16"] == {"enabled": "auto"} and config["train_micro_batch_size_per_gpu"] == "auto"


def test_an_official_name_without_the_file_is_the_packages_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--use_llm_lora", "16", "--deepspeed", "zero_stage1_config.json", "--bf16", "True"]
    resolved = resolve_deepspeed_argument(argv)
    assert resolved[:2] == argv[:2] and resolved[4:] == argv[4:]
    assert resolved[3] == str(OFFICIAL_CONFIGS / "zero_stage1_config.json")
    assert "using internvl-lora's copy of the official zero_stage1_config.json" in capsys.readouterr().out


def test_an_existing_file_always_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero_stage1_config.json").write_text('{"zero_optimization": {"stage": 2}}')
    argv = ["--deepspeed", "zero_stage1_config.json"]
    assert resolve_deepspeed_argument(argv) == argv
    assert resolve_deepspeed_argument(["--deepspeed", '{"zero_optimization": {"stage": 1}}'])[1].startswith("{")


def test_an_unknown_name_without_a_file_is_refused_naming_the_official_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--deepspeed ds\.json: no such file, and not one of the official "
                                                r"configs the package holds \(zero_stage1_config\.json, "):
        resolve_deepspeed_argument(["--deepspeed", "ds.json"])


def test_deepspeeds_adamw_runs_as_torch_adamw_unless_fused_adam_is_prebuilt():
    official = json.loads((OFFICIAL_CONFIGS / "zero_stage1_config.json").read_text())
    config = copy.deepcopy(official)
    line = avoid_op_builds(config, prebuilt=False)
    assert line.startswith("DeepSpeed's FusedAdam is not prebuilt here: the config's AdamW runs as torch's AdamW")
    assert config["optimizer"]["params"] == {**official["optimizer"]["params"], "torch_adam": True}
    assert avoid_op_builds(config, prebuilt=False) is None  # already switched

    prebuilt = copy.deepcopy(official)
    assert avoid_op_builds(prebuilt, prebuilt=True) is None and prebuilt == official
    no_optimizer = {"zero_optimization": {"stage": 2}}
    assert avoid_op_builds(no_optimizer, prebuilt=False) is None and "optimizer" not in no_optimizer


@pytest.mark.parametrize("name", ["zero_stage1_config.json", "zero_stage2_config.json"])
def test_zero_1_and_2_reduce_buckets_are_capped_at_the_trainable_weights(name):
    official = json.loads((OFFICIAL_CONFIGS / name).read_text())
    config = copy.deepcopy(official)
    line = fit_reduce_buckets(config, trainable=37_748_736, element_bytes=2)
    # The official 1e9 elements, two buckets (overlap_comm) of bf16: 3.73 GiB, of which 0.07 GiB are still needed.
    assert line == ("DeepSpeed: reduce_bucket_size 1,000,000,000 -> 37,748,736, the trainable weights' count (a "
                    "bucket never holds more): 3.58 GiB less on each GPU")
    assert config["zero_optimization"]["reduce_bucket_size"] == 37_748_736
    config["zero_optimization"]["reduce_bucket_size"] = official["zero_optimization"]["reduce_bucket_size"]
    assert config == official  # nothing else changed


def test_reduce_buckets_stay_where_they_are_no_larger_auto_or_not_zero_1_or_2():
    for config in [json.loads((OFFICIAL_CONFIGS / "zero_stage3_config.json").read_text()),
                   {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}},
                   {"zero_optimization": {"stage": 1, "reduce_bucket_size": 1_000}},
                   {"zero_optimization": {"stage": 2, "contiguous_gradients": False}},
                   {"zero_optimization": {"stage": 0}}, {}]:
        before = copy.deepcopy(config)
        assert fit_reduce_buckets(config, trainable=10_000, element_bytes=2) is None and config == before
    unset = {"zero_optimization": {"stage": 2}}  # DeepSpeed's default, 5e8, one bucket without overlap_comm
    assert fit_reduce_buckets(unset, trainable=10_000, element_bytes=4).endswith("1.86 GiB less on each GPU")
    assert unset["zero_optimization"]["reduce_bucket_size"] == 10_000
