"""The fine-tune recipe: load, freeze and wrap as the official trainer does, then train with the HF Trainer.

`finetune(model_args, data_args, training_args)` is what `internvl-lora finetune` runs; every piece of real work
is done by transformers (Trainer: precision, accumulation, schedulers, DeepSpeed / FSDP, torchrun) and PEFT.
This module decides only what the official recipe decides, fixes its known bugs, and writes our outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import get_last_checkpoint

from internvl import checkpoint
from internvl.data.collate import Collator
from internvl.data.constants import IMG_CONTEXT_TOKEN
from internvl.data.dataset import InternVLDataset, SampleBuilder
from internvl.data.packing import PackedDataset
from internvl.data.errors import EMPTY_DATASET
from internvl.data.reading import Annotations, read_meta
from internvl.data.tokenizer import load_tokenizer, resize_embeddings_for_tokenizer
from internvl.lora.fast import FastLoRA, maybe_enable_fast_lora
from internvl.lora.inject import count_params
from internvl.model.assemble import assemble_model
from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel
from internvl.train import outputs
from internvl.train.args import (
    CHECKPOINT_SETTINGS,
    OFFICIAL_DEFAULTS,
    DataArguments,
    ModelArguments,
    chosen_settings,
    fill_unset,
    official_option_notes,
)
from internvl.train.checkpointing import CheckpointPlan, checkpointable_layers, set_checkpointed_layers
from internvl.train.deepspeed_config import avoid_op_builds, fit_reduce_buckets, fused_adam_prebuilt
from internvl.train.loss_curve import write_loss_curve
from internvl.train.memory_budget import (GIB, BatchShape, FirstStepMeasure, fit_plan, peft_budget,
                                         worst_case_batch)

logger = logging.getLogger(__name__)


def _freeze(module: torch.nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad = False


def _compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def checkpoint_settings(model: InternVLChatModel) -> dict:
    """The model's own value of each setting whose default is the checkpoint's, by argument name."""
    serving = outputs.ServingSettings.from_model(model)
    return {argument: getattr(serving, field) for argument, field in CHECKPOINT_SETTINGS.items()}


def prepare_model(
    model: InternVLChatModel, tokenizer, model_args: ModelArguments, data_args: DataArguments
) -> InternVLChatModel:
    """Configure, freeze and wrap `model` for training in the official trainer's order.

    Settings the arguments leave unset (None) are the model's own. Unlike the official trainer, `unfreeze_lm_head`
    really trains the head (under LoRA it becomes a PEFT `modules_to_save` module, so the adapter carries it), and
    the ViT checkpointing is non-reentrant so its LoRA gets gradients with a frozen backbone.
    """
    fill_unset(model_args, data_args, checkpoint_settings(model))
    settings = chosen_settings(model_args, data_args)
    outputs.ServingSettings(**settings, normalize_type=data_args.normalize_type).apply_to(model)

    if resize_embeddings_for_tokenizer(model.language_model, tokenizer):
        model.config.llm_config.vocab_size = len(tokenizer)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    model.language_model.config.use_cache = False
    if model_args.grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    head = model.arch.lm_head
    if model_args.freeze_backbone:
        _freeze(model.vision_model)
    if model_args.freeze_llm:
        _freeze(model.language_model)
    if model_args.use_backbone_lora:
        r = model_args.use_backbone_lora
        model.wrap_backbone_lora(r=r, lora_alpha=2 * r, lora_dropout=model_args.lora_dropout)
    if model_args.use_llm_lora:
        r = model_args.use_llm_lora
        extra = {"modules_to_save": [head]} if model_args.unfreeze_lm_head else {}
        model.wrap_llm_lora(r=r, lora_alpha=2 * r, lora_dropout=model_args.lora_dropout, **extra)
    elif model_args.unfreeze_lm_head:
        for param in model.language_model.get_output_embeddings().parameters():
            param.requires_grad = True
    if model_args.freeze_mlp:
        _freeze(model.mlp1)
    if model_args.unfreeze_vit_layers:
        vision = model.vision_model
        vision = vision.get_base_model() if isinstance(vision, PeftModel) else vision
        for param in vision.encoder.layers[model_args.unfreeze_vit_layers:].parameters():
            param.requires_grad = True
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError(
            "nothing to train: --freeze_llm, --freeze_backbone and --freeze_mlp freeze every weight and no LoRA is "
            "set; pass --use_llm_lora R or --use_backbone_lora R, or unfreeze a part"
        )
    return model


class InternVLTrainer(Trainer):
    """The HF Trainer, saving adapters instead of full models, each checkpoint written atomically."""

    def __init__(self, *args, base_config: dict, base_path: str | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_config = base_config
        self.base_path = base_path
        self._staging_root: str | None = None
        self.step_measure = None  # FirstStepMeasure.run, set for the next micro-batch only

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, run under `step_measure` when one is set (see `FastPathCallback`)."""
        measure, self.step_measure = self.step_measure, None
        step = super().training_step
        if measure is None:
            return step(model, inputs, num_items_in_batch)
        inputs = self._prepare_inputs(inputs)
        return measure(self.model, inputs, lambda: step(model, inputs, num_items_in_batch))

    @property
    def shards_parameters(self) -> bool:
        """Whether each rank may hold only a shard of each weight (FSDP, DeepSpeed)."""
        return self.is_fsdp_enabled or self.is_deepspeed_enabled

    @property
    def shards_weights(self) -> bool:
        """Whether each rank holds only a shard of each weight: FSDP and ZeRO-3 do; DDP, ZeRO-1 and ZeRO-2 keep
        whole weights on every rank (ZeRO-1/2 shard the optimizer's states and gradients only)."""
        return self.is_fsdp_enabled or (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3, gather only the trainable weights: the Trainer would gather the whole model (or, without
        `stage3_gather_16bit_weights_on_model_save`, save adapters of zeros). Elsewhere, the Trainer's saving."""
        if not (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()):
            super().save_model(output_dir, _internal_call)
            return
        import deepspeed  # `deepspeed.zero` is an attribute of the package, not an importable module

        model = self.accelerator.unwrap_model(self.model)
        saved = outputs.saved_parameters(model, self.base_config)  # trainable, and embeddings that grew
        with deepspeed.zero.GatheredParameters(list(saved.values())):  # a collective: every rank gathers
            state_dict = {name: param.detach().cpu() for name, param in saved.items()}  # GPU -> CPU: a copy
        self._save(output_dir, state_dict=state_dict)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Under FSDP / DeepSpeed, `state_dict` holds the whole model's (or its trainable) weights, gathered by every
        # rank before this call.
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        outputs.save_outputs(model, output_dir, self.base_config, self.base_path, self.processing_class, state_dict)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _get_train_sampler(self, train_dataset=None):
        # --group_by_length (train_sampling_strategy "group_by_length"): the HF sampler would build every sample to
        # measure it; the dataset estimates lengths from its lines instead.
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, InternVLDataset):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths())
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """A packed stream is read as the official trainer reads it: each rank's DataLoader reads its own share
        (`PackedDataset` splits by rank and worker), never split or dispatched again by accelerate."""
        if not isinstance(self.train_dataset, PackedDataset):
            return super().get_train_dataloader()
        args = self.args
        workers = args.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_size=args.per_device_train_batch_size, collate_fn=self.data_collator,
            num_workers=workers, pin_memory=args.dataloader_pin_memory,
            prefetch_factor=args.dataloader_prefetch_factor if workers else None)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's batches of one optimizer step and their loss divisor: the token count, or with loss
        weights (--loss_reduction sample / square) the sum of the weights, over the step (and the ranks when
        --average_tokens_across_devices), so that accumulated micro-batches weigh as one batch does."""
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        if count is None or not batches or "loss_weight" not in batches[0]:
            return batches, count
        weight = sum(batch["loss_weight"][..., 1:].sum() for batch in batches).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            weight = self.accelerator.gather(weight).sum()
        return batches, weight

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        # Every rank writes into a staging folder; the main process renames the complete checkpoint into place.
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        self._staging_root = os.path.join(run_dir, ".staging")
        if self.args.should_save:  # what a killed run left half-written there
            shutil.rmtree(os.path.join(self._staging_root, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = os.path.join(run_dir, name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(run_dir, ".staging", name), target)
            with contextlib.suppress(OSError):  # empty now, unless another writer is busy in it
                os.rmdir(os.path.join(run_dir, ".staging"))
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        """Delete checkpoints beyond save_total_limit (transformers moved this helper in 5.2x)."""
        if hasattr(self, "_rotate_checkpoints"):
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
            return
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The manifest was checked against the base model before training (resume_checkpoint); DeepSpeed never
        # calls this method.
        if self.is_fsdp_enabled:
            # Sharded weights: HF reads the FSDP checkpoint its _save_checkpoint wrote beside our outputs.
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        outputs.load_outputs_into(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


def load_base_model(model_args: ModelArguments, data_args: DataArguments, dtype: torch.dtype) -> InternVLChatModel:
    """The model to fine-tune: the checkpoint at --model_name_or_path, or one assembled from --vision_path,
    --llm_path (and --mlp_path) as the official trainer does, with the official defaults where flags are unset."""
    if model_args.model_name_or_path is not None:
        config = InternVLChatConfig.from_dict(checkpoint.read_config(model_args.model_name_or_path))
        config.vision_config.drop_path_rate = model_args.drop_path_rate
        return InternVLChatModel.from_pretrained(model_args.model_name_or_path, config=config, torch_dtype=dtype)
    if model_args.vision_path is None or model_args.llm_path is None:
        raise ValueError("--model_name_or_path is required, or --vision_path and --llm_path to assemble a model from "
                         "its parts (or run `internvl-lora demo`)")
    fill_unset(model_args, data_args, OFFICIAL_DEFAULTS)
    return assemble_model(model_args.vision_path, model_args.llm_path, model_args.mlp_path, dtype,
                          model_args.drop_path_rate, **chosen_settings(model_args, data_args),
                          pad2square=data_args.pad2square)


def check_inputs(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Fail before the model loads when a file the run needs is missing: model, meta file, its JSONL, checkpoint."""
    model_path = model_args.model_name_or_path
    if model_path is not None and not os.path.isdir(model_path):
        raise FileNotFoundError(
            f"--model_name_or_path {model_path}: no such folder. Weights are never downloaded here: fetch the "
            "checkpoint first (e.g. `huggingface-cli download OpenGVLab/InternVL2_5-8B --local-dir DIR`) and pass DIR"
        )
    if data_args.meta_path is None:
        raise ValueError("--meta_path is required: the meta JSON naming the training JSONL files")
    for flag, meta_path in (("--meta_path", data_args.meta_path), ("--eval_meta_path", data_args.eval_meta_path)):
        if meta_path is None:
            continue
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{flag} {meta_path}: no such file")
        for spec in read_meta(meta_path):
            if not os.path.isfile(spec.annotation):
                raise FileNotFoundError(f"{meta_path}: dataset {spec.name!r}: annotation file {spec.annotation} not "
                                        "found")
            for problem in Annotations(spec).problems(meta_path):  # before the model loads, which takes minutes
                if problem.cause == EMPTY_DATASET:
                    raise problem
    for option in ("vision_path", "llm_path", "mlp_path"):
        path = getattr(model_args, option)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"--{option} {path}: no such file or folder")
    if os.path.exists(training_args.output_dir) and not os.path.isdir(training_args.output_dir):
        raise ValueError(f"--output_dir {training_args.output_dir}: is a file, not a folder; pass a folder to write to")
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such folder")
    if data_args.use_packed_ds and training_args.max_steps <= 0:
        raise ValueError("--use_packed_ds True: packs stream without a length (as officially): give --max_steps, "
                         "the number of optimizer steps to train")
    if model_args.save_full_model:  # a model merged by an earlier run may go, nothing else
        outputs.check_merge_output(Path(training_args.output_dir) / outputs.FULL_MODEL, overwrite=True)


# What an output folder may hold and still count as empty: our TensorBoard logs and staging folder, which a run
# killed before its first checkpoint leaves behind.
_NO_TRAINING_STATE = {"runs", ".staging"}


def resume_checkpoint(training_args: TrainingArguments, base_config: dict, model_args: ModelArguments) -> str | None:
    """The checkpoint to resume from, checked against the base model: --resume_from_checkpoint, else (as the
    official script does) the last complete `checkpoint-N` in output_dir, else None.

    With `--overwrite_output_dir True` nothing is resumed (the run starts afresh); with False, an output folder that
    holds something but no checkpoint is refused, as officially.
    """
    resume = training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    if resume is None and os.path.isdir(output_dir) and not model_args.overwrite_output_dir:
        resume = get_last_checkpoint(output_dir)
        holds_state = resume is None and bool(set(os.listdir(output_dir)) - _NO_TRAINING_STATE)
        if holds_state and model_args.overwrite_output_dir is False:
            raise ValueError(f"--output_dir {output_dir}: already exists and is not empty, and holds no checkpoint to "
                             "resume from; pass --overwrite_output_dir True to train afresh in it, or another folder")
        if resume is not None and training_args.process_index == 0:
            print(f"Resuming from {resume}, the last checkpoint in --output_dir (pass another --output_dir, or "
                  "--overwrite_output_dir True, to start afresh)")
    if resume is not None:
        manifest = outputs.read_manifest(resume)
        outputs.check_base(manifest, resume, base_config, model_args.force_base_model)
        outputs.check_ranks(manifest, resume, model_args)
    return resume


def check_sharding(trainer: InternVLTrainer, model_args: ModelArguments) -> None:
    """Refuse an --fsdp that accelerate would drop without a word, and --save_full_model of sharded weights."""
    args = trainer.args
    if args.fsdp and not (trainer.is_fsdp_enabled or trainer.is_fsdp_xla_enabled):
        raise ValueError(
            f"--fsdp: accelerate does not apply FSDP to this {trainer.accelerator.distributed_type.value} run, only to "
            "several GPUs (or NPUs, XPUs) started by torchrun or accelerate launch; drop --fsdp for plain DDP"
        )
    if model_args.save_full_model and trainer.shards_parameters:
        raise ValueError(
            "--save_full_model merges the whole model in one process, which --fsdp / --deepspeed shard; merge "
            f"afterwards instead: internvl-lora merge {trainer.base_path or 'BASE'} OUT --adapter {args.output_dir}"
        )


def largest_batch(data_args: DataArguments, training_args: TrainingArguments) -> BatchShape:
    """The largest batch the run's settings allow (see `internvl.train.memory_budget`)."""
    rows = training_args.per_device_train_batch_size
    if data_args.use_packed_ds:
        return BatchShape(rows, rows * data_args.max_packed_tokens, rows * data_args.num_images_expected, packed=True)
    return BatchShape(rows, data_args.max_seq_length, data_args.max_dynamic_patch + int(bool(data_args.use_thumbnail)))


def fast_path_off_reason(trainer: InternVLTrainer) -> str | None:
    """Why the fused path cannot train under this run's engine, or None: FSDP and ZeRO-3 shard each weight and
    gather it only as its own module runs, while a fused node reads several modules' weights at once. DDP, ZeRO-1
    and ZeRO-2 keep whole weights on every rank."""
    if not trainer.shards_weights:
        return None
    if trainer.is_fsdp_enabled:
        return "FSDP shards the weights the fused nodes read"
    return "DeepSpeed ZeRO-3 shards the weights the fused nodes read (ZeRO-1 and ZeRO-2 keep the fused path)"


class FastPathCallback(TrainerCallback):
    """Put the LLM's LoRA on the fused path once the engine has placed the model on its device (DeepSpeed does that
    inside `train()`); `restore()` puts PEFT's layers back (finetune calls it however training ends).

    With `--grad_checkpoint`, the LLM's layers then follow a checkpoint plan: fixed by `--recompute_mlp_only`, or
    fitted on the GPU to the run's largest batch (`shape`) and a budget of peak memory (`internvl.train.
    memory_budget`): `--memory_budget_gib`, else HF + PEFT's with every layer checkpointed. The first step runs with
    every layer checkpointed and measures what the engine takes beyond the layers (its buffers, the optimizer's
    states); the plan is fitted after it, to the budget less that.
    """

    def __init__(self, trainer: InternVLTrainer, model: InternVLChatModel, model_args: ModelArguments,
                 shape: BatchShape):
        self.trainer, self.model, self.model_args, self.shape = trainer, model, model_args, shape
        self.handle: FastLoRA | None = None
        self.peft_peak: int | None = None  # HF + PEFT's probe peak on the largest batch, when it is the budget
        self.first_step: FirstStepMeasure | None = None  # set while a plan waits to be fitted

    def on_train_begin(self, args, state, control, **kwargs):
        """Swap the fused path in, or log why not; then set the checkpoint plan, or arm its fit."""
        if not (self.model_args.fast_lora and self.model_args.use_llm_lora):
            return
        reason = fast_path_off_reason(self.trainer)
        if reason is not None:
            logger.warning("Fast LoRA off, training runs PEFT's own layers: %s", reason)
            return
        llm = self.model.language_model
        fit = (self.model_args.grad_checkpoint and self.model_args.recompute_mlp_only is None
               and self.model.device.type == "cuda")
        if fit and not self.model_args.memory_budget_gib:  # measured on PEFT's layers, before the swap
            batch = worst_case_batch(self.model, self.trainer.processing_class, self.shape, self.model.device)
            self.peft_peak = peft_budget(self.model, llm, batch)
            del batch
        self.handle = maybe_enable_fast_lora(llm)
        if self.handle is None:
            return
        if args.process_index == 0:
            print(f"LLM LoRA on the fused fast path: {self.handle}")
        if not self.model_args.grad_checkpoint:
            return
        if fit:
            set_checkpointed_layers(llm, CheckpointPlan())
            self.first_step = FirstStepMeasure()
            self.trainer.step_measure = self.first_step.run
        elif self.model_args.recompute_mlp_only:
            plan = CheckpointPlan(recompute_mlp=len(checkpointable_layers(llm)))
            set_checkpointed_layers(llm, plan)
            if args.process_index == 0:
                print(f"LLM layers: {plan}")

    def on_step_end(self, args, state, control, **kwargs):
        """After the first step: fit the plan to the budget less the engine's share."""
        if self.first_step is None or self.first_step.transient is None:
            return
        share, self.first_step = self.first_step.share(), None
        if state.global_step >= state.max_steps:
            return
        if self.model_args.memory_budget_gib:
            budget, where = int(self.model_args.memory_budget_gib * GIB), "--memory_budget_gib"
        else:  # PEFT's real step takes the same engine share on top of its probe's peak
            budget, where = self.peft_peak + share.persistent + share.transient, "HF + PEFT's, all checkpointed"
        llm = self.model.language_model
        batch = worst_case_batch(self.model, self.trainer.processing_class, self.shape, self.model.device)
        plan = fit_plan(self.model, llm, batch, budget - share.transient)
        if args.process_index == 0:
            print(f"LLM layers: {plan} (budget {budget / GIB:.2f} GiB: {where}, on {self.shape}; {share})")

    def restore(self) -> None:
        """PEFT's own layers back (the handle is restored once, however often this is called)."""
        if self.handle is not None:
            self.handle.restore()
            self.handle = None


def trainable_digest(model: torch.nn.Module) -> str:
    """A SHA-256 of every trainable weight's bytes: equal digests mean identical adapters."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_ranks_agree(model: torch.nn.Module, sharded: bool) -> None:
    """Compare the trainable weights of every process of a distributed run; raise if any rank diverged.

    Nothing to compare in one process, nor under FSDP / ZeRO-3, which leave each rank its own shard.
    """
    if sharded or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    digest = trainable_digest(model)
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different trainable weights (digests per rank: {digests})")
    print(f"rank {torch.distributed.get_rank()}: all {len(digests)} ranks hold identical trainable weights "
          f"(sha256 {digest})")


FINISHED_STATE = "trainer_state.json"  # written into output_dir last: the run finished and its outputs are complete


class RunFinished(Exception):
    """The run has already trained every step it was asked for; `from_outputs`: its weights are in output_dir's own
    final outputs (there was no checkpoint to resume from)."""

    def __init__(self, step: int, from_outputs: bool):
        super().__init__(step)
        self.step, self.from_outputs = step, from_outputs


class FinishedRunGuard(TrainerCallback):
    """Stop a re-run of a finished run before it trains a step.

    Resumed at its last step, the HF Trainer still trains one more (and saves checkpoint-N+1), so every re-run of a
    finished command would change its adapter. `finished` is the state the run wrote into output_dir when it ended.
    """

    def __init__(self, output_dir: str, finished: TrainerState | None):
        self.output_dir, self.finished = output_dir, finished

    def on_train_begin(self, args, state, control, **kwargs):
        """Called once the checkpoint (if any) is loaded and `state.max_steps` is this run's total."""
        if state.global_step >= state.max_steps:
            raise RunFinished(state.global_step, from_outputs=False)
        if state.global_step == 0 and self.finished is not None:  # nothing to resume, but a finished run is here
            if self.finished.global_step >= state.max_steps:
                raise RunFinished(self.finished.global_step, from_outputs=True)
            raise ValueError(
                f"--output_dir {self.output_dir}: holds a finished run of {self.finished.global_step} steps and no "
                f"checkpoint-N to continue it to {state.max_steps} steps (it was saved with --save_strategy no); "
                "pass another --output_dir"
            )


class DatasetEpoch(TrainerCallback):
    """Tell the dataset each epoch as it begins (before its DataLoader iterator starts), so that its video frames
    are drawn anew every epoch, and a resumed run draws what the uninterrupted one did."""

    def __init__(self, dataset: InternVLDataset | PackedDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch))  # resumed mid-epoch, state.epoch is that epoch and a fraction


def finished_state(output_dir: str | os.PathLike) -> TrainerState | None:
    """The final state of the run that finished in `output_dir`, or None when none did."""
    path = Path(output_dir) / FINISHED_STATE
    return TrainerState.load_from_json(str(path)) if path.is_file() else None


def interrupted_message(output_dir: str | os.PathLike) -> str:
    """One line for a run stopped by Ctrl-C or SIGTERM: what is safe on disk, and how to go on."""
    last = get_last_checkpoint(str(output_dir)) if os.path.isdir(output_dir) else None
    if last is None:
        return (f"interrupted before the first checkpoint: nothing was saved in {output_dir} (checkpoints are written "
                "every --save_steps); the same command starts afresh")
    return f"interrupted; the last complete checkpoint is {last}: run the same command again to resume from it"


# Each part of the model: the config field of its LoRA rank, and the flag that freezes it.
_PARTS = {"vision_model": ("use_backbone_lora", "--freeze_backbone"), "mlp1": (None, "--freeze_mlp"),
          "language_model": ("use_llm_lora", "--freeze_llm")}


def describe_trainable(model: InternVLChatModel) -> str:
    """Which parts train and how, e.g. `language_model LoRA r=16 (37,748,736); mlp1 fully (33,570,816: --freeze_mlp
    True freezes it)`: the official defaults train the ViT and projector fully beside an LLM LoRA."""
    parts = []
    for name, (rank_field, freeze_flag) in _PARTS.items():
        module = getattr(model, name)
        counts = count_params(module)
        lora = sum(getattr(p, "ds_numel", p.numel()) for n, p in module.named_parameters()
                   if p.requires_grad and "lora_" in n)
        how = [f"LoRA r={getattr(model.config, rank_field)} ({lora:,})"] if lora else []
        rest = counts.trainable - lora
        if rest == counts.total:
            how.append(f"fully ({rest:,}: {freeze_flag} True freezes it)")
        elif rest:
            how.append(f"{rest:,} weights outside LoRA")
        if how:
            parts.append(f"{name} {' + '.join(how)}")
    return "; ".join(parts)


@dataclass
class FinetuneResult:
    """What a fine-tune produced: the output folder, the loss history and the trainable counts."""

    output_dir: Path
    losses: list[tuple[int, float]]
    trainable_params: int
    total_params: int


def training_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every logged step; a run shorter than --logging_steps logs none, then its mean loss at its
    last step (the Trainer's `train_loss`)."""
    losses = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    if not losses:
        losses = [(entry["step"], entry["train_loss"]) for entry in log_history if "train_loss" in entry][-1:]
    return losses


def evaluation_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, eval loss) of every evaluation during training (--eval_strategy)."""
    return [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]


def write_eval_report(trainer: InternVLTrainer, model: InternVLChatModel, data_args: DataArguments) -> None:
    """The trained model's loss and generation metrics on --eval_meta_path, into OUTPUT_DIR/eval (on the main
    process; not under FSDP or DeepSpeed, which leave each rank a shard of the weights to generate with)."""
    if not trainer.args.should_save:
        return
    if trainer.shards_parameters:
        print("generation metrics skipped under FSDP / DeepSpeed; measure them afterwards: internvl-lora eval "
              f"{trainer.base_path or 'BASE'} --adapter {trainer.args.output_dir} "
              f"--meta_path {data_args.eval_meta_path}")
        return
    from internvl.evaluation.compare import evaluate_trained  # sacrebleu and rouge-score: only when asked
    from internvl.evaluation.settings import EvalSettings

    settings = EvalSettings(data_args.eval_meta_path, batch_size=trainer.args.per_device_eval_batch_size,
                            max_seq_length=data_args.max_seq_length)
    folder = evaluate_trained(model, trainer.processing_class, settings, trainer.args.output_dir, trainer.base_path)
    print(f"eval report, per-sample answers and chart in {folder}")


def write_final_outputs(trainer: InternVLTrainer, model: InternVLChatModel, model_args: ModelArguments,
                        data_args: DataArguments) -> None:
    """Adapters, loss history and curve, the eval report if asked, the merged model if asked, and last the finished
    state that marks them complete (a run interrupted before that writes them again when re-run)."""
    output_dir = Path(trainer.args.output_dir)
    if trainer.args.should_save:  # a finished state from an earlier, shorter run no longer describes the outputs
        (output_dir / FINISHED_STATE).unlink(missing_ok=True)
    trainer.save_model(str(output_dir))
    losses = training_losses(trainer.state.log_history)
    if trainer.args.should_save and losses:
        (output_dir / "loss_history.json.tmp").write_text(json.dumps(losses) + "\n")
        os.replace(output_dir / "loss_history.json.tmp", output_dir / "loss_history.json")
        write_loss_curve(losses, output_dir / "loss_curve.png", evaluation_losses(trainer.state.log_history))
    if data_args.eval_meta_path:
        write_eval_report(trainer, model, data_args)
    if trainer.args.should_save and model_args.save_full_model:
        outputs.save_merged_model(model, output_dir / outputs.FULL_MODEL, output_dir, trainer.base_path,
                                  overwrite=True)
    trainer.save_state()  # the marker: written on the main process only


def finetune(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
             model: InternVLChatModel | None = None, tokenizer=None,
             callbacks: list[TrainerCallback] | None = None) -> FinetuneResult:
    """Train per the arguments; write adapters, tokenizer, manifest, loss curve (and the merged model) to output_dir.

    `model` / `tokenizer` may be passed in (the demo and the end-to-end bench build their own); otherwise both load
    from `model_args.model_name_or_path`. `callbacks` go to the HF Trainer. Run again, it resumes from the last
    checkpoint in output_dir; a finished run trains nothing.
    """
    set_seed(training_args.seed)
    base_path = model_args.model_name_or_path
    check_inputs(model_args, data_args, training_args)
    if model is None:
        model = load_base_model(model_args, data_args, _compute_dtype(training_args))
        tokenizer = load_tokenizer(base_path or model_args.llm_path, data_args.max_seq_length)
    taken = fill_unset(model_args, data_args, checkpoint_settings(model))
    if training_args.process_index == 0:
        if taken:
            print("from the checkpoint's config: " + ", ".join(f"--{name} {value}" for name, value in taken.items()))
        for note in official_option_notes(model_args, data_args):
            print(note)
    base_config = model.config.to_dict()
    resume = resume_checkpoint(training_args, base_config, model_args)
    finished = None if model_args.overwrite_output_dir else finished_state(training_args.output_dir)
    model = prepare_model(model, tokenizer, model_args, data_args)
    counts = count_params(model)
    if training_args.process_index == 0:
        print(f"trainable: {counts.trainable:,} of {counts.total:,} parameters ({counts.share:.3f}%): "
              f"{describe_trainable(model)}")
    builder = SampleBuilder(
        tokenizer,
        template_name=data_args.conv_style,
        num_image_token=model.num_image_token,
        image_size=data_args.force_image_size,
        dynamic_image_size=data_args.dynamic_image_size,
        use_thumbnail=data_args.use_thumbnail,
        min_dynamic_patch=data_args.min_dynamic_patch,
        max_dynamic_patch=data_args.max_dynamic_patch,
        # A packed sample never spans two packs (officially: max_tokens capped at max_packed_tokens).
        max_seq_length=(min(data_args.max_seq_length, data_args.max_packed_tokens) if data_args.use_packed_ds
                        else data_args.max_seq_length),
        normalize_type=data_args.normalize_type,
        pad2square=data_args.pad2square,
        min_num_frame=data_args.min_num_frame,
        max_num_frame=data_args.max_num_frame,
    )
    samples = InternVLDataset(data_args.meta_path, builder, skip_bad_samples=data_args.skip_bad_samples,
                              seed=training_args.seed)
    train_dataset = samples
    if data_args.use_packed_ds:
        train_dataset = PackedDataset(
            samples, max_packed_tokens=data_args.max_packed_tokens, num_images_expected=data_args.num_images_expected,
            max_buffer_size=data_args.max_buffer_size, replacement=data_args.replacement,
            log_freq=data_args.log_freq, seed=training_args.seed, rank=training_args.process_index,
            world_size=training_args.world_size)
        if training_args.process_index == 0:
            print(f"packing samples into rows of at most {data_args.max_packed_tokens:,} tokens and "
                  f"{data_args.num_images_expected} tiles (strict_mode {data_args.strict_mode}, replacement "
                  f"{data_args.replacement}); loss_reduction {data_args.loss_reduction}")
    eval_dataset = InternVLDataset(data_args.eval_meta_path, builder) if data_args.eval_meta_path else None
    training_args.remove_unused_columns = False
    strict = data_args.use_packed_ds and data_args.strict_mode  # packs padded to the expected tokens and tiles
    if data_args.loss_reduction_all_gather:  # the official flag: the loss divisor summed over the ranks
        training_args.average_tokens_across_devices = True
    training_args.prediction_loss_only = True  # the Trainer would otherwise gather every eval batch's logits
    if training_args.deepspeed:
        config = training_args.hf_deepspeed_config.config
        element_bytes = 2 if training_args.bf16 or training_args.fp16 else 4
        for line in (avoid_op_builds(config, fused_adam_prebuilt()),
                     fit_reduce_buckets(config, counts.trainable, element_bytes)):
            if line and training_args.process_index == 0:
                print(line)
    trainer = InternVLTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=Collator(
            pad_token_id=tokenizer.pad_token_id, pack=data_args.use_packed_ds, image_size=data_args.force_image_size,
            loss_reduction=data_args.loss_reduction,
            strict_tokens=data_args.max_packed_tokens if strict else None,
            strict_tiles=data_args.num_images_expected if strict else None,
        ),
        processing_class=tokenizer,
        base_config=base_config,
        base_path=base_path,
        callbacks=[FinishedRunGuard(training_args.output_dir, finished), DatasetEpoch(train_dataset),
                   *(callbacks or [])],
    )
    check_sharding(trainer, model_args)
    fast = FastPathCallback(trainer, model, model_args, largest_batch(data_args, training_args))
    trainer.add_callback(fast)
    trained = True
    try:
        trainer.train(resume_from_checkpoint=resume)
    except RunFinished as done:
        trained = False
        if training_args.process_index == 0:
            print(f"{training_args.output_dir}: the run already finished at step {done.step}; nothing to train (a "
                  "larger --max_steps or --num_train_epochs trains on; another --output_dir starts afresh)")
        if done.from_outputs:
            outputs.load_outputs_into(model, training_args.output_dir)
            trainer.state = finished
    finally:
        fast.restore()
    # Training switched the LLM's KV cache off; whatever is saved from here on is for inference.
    model.config.llm_config.use_cache = base_config["llm_config"].get("use_cache", True)
    check_ranks_agree(model, sharded=trainer.shards_weights)
    if trained or finished is None:  # else they are complete; None: interrupted while writing them
        write_final_outputs(trainer, model, model_args, data_args)
    samples.skip_report()
    return FinetuneResult(Path(training_args.output_dir), training_losses(trainer.state.log_history),
                          counts.trainable, counts.total)
