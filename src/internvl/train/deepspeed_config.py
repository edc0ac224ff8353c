"""`--deepspeed` as the official scripts pass it: an official config's file name works without the file, and an
official config trains on a DeepSpeed installed without its compiled ops.

The official scripts pass `--deepspeed zero_stage1_config.json` (ZeRO-1 up to 8B, ZeRO-3 files above), a file of
the official repository. Where no such file exists, the package's copy of that official config
(`internvl/deepspeed_configs/`, the official values) is used; an existing file always wins.

Those configs name DeepSpeed's AdamW, which DeepSpeed builds as a CUDA extension on first use when it was installed
without prebuilt ops (the pip default): that needs nvcc and fails on some GPUs (an H200 reports the architecture
"9.0a", which the build cannot parse). Then the config's own `torch_adam` switch makes DeepSpeed run torch's AdamW,
with the same betas, eps and weight decay, instead.

ZeRO-1 and ZeRO-2 collect gradients in reduce buckets of `reduce_bucket_size` elements, allocated at every backward
(two with `overlap_comm`): under the official configs' 1e9 that is 3.7 GiB in bf16, for a LoRA run whose gradients
fill a few tens of millions of elements. A bucket never holds more than the trainable weights, so capping it there
reduces the same sums and frees the rest.
"""

from __future__ import annotations

from pathlib import Path

OFFICIAL_CONFIGS = Path(__file__).resolve().parent.parent / "deepspeed_configs"
ADAM_TYPES = ("adam", "adamw")  # DeepSpeed's optimizer types served by its FusedAdam extension
DEFAULT_REDUCE_BUCKET_SIZE = 500_000_000  # DeepSpeed's, where a ZeRO config names none
GIB = 2**30


def official_config_names() -> list[str]:
    """The official DeepSpeed config file names the package holds a copy of."""
    return sorted(path.name for path in OFFICIAL_CONFIGS.glob("*.json"))


def resolve_deepspeed_argument(argv: list[str]) -> list[str]:
    """`argv` with a `--deepspeed NAME` that names no file but an official config pointed at the package's copy."""
    resolved = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg != "--deepspeed":
            continue
        value = argv[i + 1]
        if value.lstrip().startswith("{") or Path(value).exists():
            continue  # inline JSON, or the user's own file
        copy = OFFICIAL_CONFIGS / Path(value).name
        if not copy.is_file():
            raise FileNotFoundError(
                f"--deepspeed {value}: no such file, and not one of the official configs the package holds "
                f"({', '.join(official_config_names())})"
            )
        print(f"--deepspeed {value}: no such file here; using internvl-lora's copy of the official {copy.name}")
        resolved[i + 1] = str(copy)
    return resolved


def fused_adam_prebuilt() -> bool:
    """Whether DeepSpeed was installed with its FusedAdam extension compiled (DS_BUILD_FUSED_ADAM=1)."""
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("fused_adam"))


def avoid_op_builds(config: dict, prebuilt: bool) -> str | None:
    """Switch a DeepSpeed Adam/AdamW in `config` (in place) to torch's implementation when DeepSpeed would have to
    JIT-build its FusedAdam; returns the line to print, or None when nothing changed."""
    optimizer = config.get("optimizer")
    if prebuilt or not isinstance(optimizer, dict) or str(optimizer.get("type", "")).lower() not in ADAM_TYPES:
        return None
    params = optimizer.setdefault("params", {})
    if params.get("torch_adam"):
        return None
    params["torch_adam"] = True
    return (f"DeepSpeed's FusedAdam is not prebuilt here: the config's {optimizer['type']} runs as torch's AdamW "
            "(same betas, eps, weight decay; torch_adam) instead of a CUDA build at start-up")


def fit_reduce_buckets(config: dict, trainable: int, element_bytes: int) -> str | None:
    """Cap a ZeRO-1/2 `config`'s `reduce_bucket_size` (in place) at the `trainable` weights' element count; returns
    the line to print, or None when nothing changed. `element_bytes`: the size of one gradient element."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (1, 2) or zero.get("contiguous_gradients") is False:
        return None
    size = zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET_SIZE)
    if isinstance(size, str) or size <= trainable:  # "auto": the Trainer sizes it to the model
        return None
    zero["reduce_bucket_size"] = trainable
    buckets = 2 if zero.get("overlap_comm") else 1
    freed = buckets * (int(size) - trainable) * element_bytes / GIB
    return (f"DeepSpeed: reduce_bucket_size {int(size):,} -> {trainable:,}, the trainable weights' count (a bucket "
            f"never holds more): {freed:.2f} GiB less on each GPU")
