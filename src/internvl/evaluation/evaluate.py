"""One model on held-out data in the training format: the loss on the answers, and its own answers scored.

Samples are made by the training data's `SampleBuilder` (template, tiling, tokenization and label masking as in
training), with the settings the model serves with (`ServingSettings`: an adapter's are put on with it), so:
- the loss is the training loss: next-token cross-entropy on the tokens the labels keep (every answer of a
  multi-turn record, with its end-of-turn token), summed over a dataset and divided by its token count;
  perplexity is its exp. (The Trainer's `eval_loss` is a mean of batch means instead: close, not equal.)
- the generation prompt is the sample's tokens before its last answer's first learned token: the earlier turns,
  answers included, the last question and the assistant's role prefix, as training saw them. The answer generated
  greedily from it is scored against the record's last `gpt` turn (`internvl.evaluation.metrics`).
Each distinct line of a dataset is one sample (`repeat_time` repeats none). Prompts are generated in batches, left
padded; a batch's tiles are made when it is evaluated, so memory holds one batch of them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import set_seed

from internvl.data.collate import pad_batch
from internvl.data.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, VIDEO_PLACEHOLDER
from internvl.data.dataset import SampleBuilder
from internvl.data.reading import Annotations, read_meta
from internvl.data.templates import get_conv_template
from internvl.evaluation.metrics import Scores, score_answer, score_corpus
from internvl.evaluation.settings import EvalSettings
from internvl.model.internvl_chat import InternVLChatModel, decode_answers
from internvl.train.outputs import ServingSettings

OVERALL = "overall"  # the key of the scores over every dataset together


@dataclass
class SampleResult:
    """One sample: where it is, its last question and reference answer, the model's answer, its scores and loss."""

    dataset: str
    source: str  # FILE:LINE
    question: str
    reference: str
    answer: str
    scores: Scores
    loss_sum: float  # summed over the sample's answer tokens
    tokens: int

    @property
    def loss(self) -> float:
        """The mean loss per answer token."""
        return self.loss_sum / max(self.tokens, 1)


@dataclass(frozen=True)
class Summary:
    """A dataset's (or all datasets') results."""

    samples: int
    loss: float
    perplexity: float
    scores: Scores

    def as_dict(self) -> dict:
        return {"samples": self.samples, "loss": self.loss, "perplexity": self.perplexity, **self.scores.as_dict()}


def select_samples(settings: EvalSettings) -> list[tuple[Annotations, int]]:
    """(dataset, line index) of every sample evaluated, dataset by dataset in meta order, lines in file order."""
    chosen = []
    for spec in read_meta(settings.meta_path):
        part = Annotations(spec)
        indices = range(part.distinct)
        if settings.max_samples is not None and settings.max_samples < part.distinct:
            # One generator per dataset: a dataset's choice does not depend on the datasets before it.
            indices = sorted(random.Random(f"{settings.seed}:{spec.name}").sample(indices, settings.max_samples))
        chosen += [(part, index) for index in indices]
    return chosen


def sample_builder(model: InternVLChatModel, tokenizer, max_seq_length: int) -> SampleBuilder:
    """The training data's sample builder with the settings the model serves with (an adapter's, once on it)."""
    serving = ServingSettings.from_model(model)
    return SampleBuilder(
        tokenizer, serving.template, model.num_image_token, serving.force_image_size, serving.dynamic_image_size,
        serving.use_thumbnail, serving.min_dynamic_patch, serving.max_dynamic_patch, max_seq_length,
        serving.normalize_type,
    )


def last_answer_start(labels: torch.Tensor, answers: int, source: str) -> int:
    """Where the last answer's learned tokens begin in a sample's labels [T] holding `answers` answers.

    Answers are runs of learned labels, apart from each other by the questions between them; fewer runs than
    answers means the length limit cut the last one off.
    """
    learned = (labels != IGNORE_INDEX).nonzero().flatten()  # [K]
    run_starts = learned[torch.cat([torch.ones(1, dtype=torch.bool), learned[1:] - learned[:-1] > 1])]
    if len(run_starts) < answers:
        raise ValueError(f"{source}: the last answer lies beyond the length limit; raise --max_seq_length")
    return int(run_starts[-1])


def _answer_losses(model: InternVLChatModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss's terms: next-token cross-entropy summed over each row's learned tokens [B], and their
    count [B]. Only the learned positions' logits are upcast, not the whole [B, T, vocab]."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits[:, :-1]  # [B, T-1, V]: position t predicts token t+1
    targets = batch["labels"][:, 1:]
    learned = targets != IGNORE_INDEX  # [B, T-1]
    nll = F.cross_entropy(logits[learned].float(), targets[learned], reduction="none")  # [K]
    rows = learned.nonzero()[:, 0]
    return torch.zeros(len(targets), device=nll.device).index_add_(0, rows, nll), learned.sum(1)


def _left_pad(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [T_i] -> input_ids and attention_mask [B, max T_i], padded on the left for generation."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = prompt
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids, attention_mask


def _generate(model: InternVLChatModel, tokenizer, prompts: list[torch.Tensor], batch: dict[str, torch.Tensor],
              max_new_tokens: int) -> list[str]:
    """Greedy answers to the prompts, whose images are the batch's tiles."""
    template = get_conv_template(model.template)
    input_ids, attention_mask = _left_pad(prompts, tokenizer.pad_token_id)
    device = batch["input_ids"].device
    features = model.extract_feature(batch["pixel_values"])[batch["image_flags"] == 1]  # a text-only row has none
    output_ids = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), visual_features=features,
        max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tokenizer.convert_tokens_to_ids(template.stop_token), pad_token_id=tokenizer.pad_token_id,
    )
    return decode_answers(tokenizer, output_ids, template)


def _question(conversations: list[dict[str, str]]) -> str:
    """The last question, as a reader wants it: without the image or video placeholder."""
    return conversations[-2]["value"].replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "").strip()


def _evaluate_batch(model: InternVLChatModel, tokenizer, builder: SampleBuilder, group: list[tuple[Annotations, int]],
                    max_new_tokens: int) -> list[SampleResult]:
    """The results of one batch of samples: the loss on their answers, then their last answers generated."""
    records = [part.record(index) for part, index in group]
    samples = [builder.build(record, part.spec.max_dynamic_patch) for record, (part, _) in zip(records, group)]
    device = model.language_model.get_input_embeddings().weight.device
    batch = {key: value.to(device) for key, value in pad_batch(samples, tokenizer.pad_token_id).items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.vision_dtype)
    loss_sums, counts = _answer_losses(model, batch)
    prompts = []
    for sample, record in zip(samples, records):
        answers = sum(turn["from"] == "gpt" for turn in record.conversations)
        start = last_answer_start(sample["labels"], answers, f"{record.file}:{record.line}")
        prompts.append(sample["input_ids"][:start])
    results = []
    for (part, _), record, answer, loss_sum, count in zip(
        group, records, _generate(model, tokenizer, prompts, batch, max_new_tokens), loss_sums, counts
    ):
        reference = record.conversations[-1]["value"]
        results.append(SampleResult(part.spec.name, f"{record.file}:{record.line}", _question(record.conversations),
                                    reference, answer, score_answer(answer, reference), float(loss_sum), int(count)))
    return results


@torch.no_grad()
def evaluate_model(model: InternVLChatModel, tokenizer, settings: EvalSettings, name: str = "model",
                   ) -> list[SampleResult]:
    """Every selected sample's loss and generated answer (seeded by `settings.seed`), with a progress bar; the
    model is in eval mode meanwhile."""
    set_seed(settings.seed)
    was_training = model.training
    model.eval()
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    builder = sample_builder(model, tokenizer, settings.max_seq_length)
    chosen = select_samples(settings)
    results = []
    try:
        with tqdm(total=len(chosen), desc=f"eval {name}", unit="sample") as progress:
            for first in range(0, len(chosen), settings.batch_size):
                group = chosen[first:first + settings.batch_size]
                results += _evaluate_batch(model, tokenizer, builder, group, settings.max_new_tokens)
                progress.update(len(group))
    finally:
        model.train(was_training)
    return results


def summarize(results: list[SampleResult]) -> dict[str, Summary]:
    """Per dataset (in the order met) and `OVERALL`: samples, token-weighted loss, perplexity and corpus scores."""
    groups: dict[str, list[SampleResult]] = {}
    for result in results:
        groups.setdefault(result.dataset, []).append(result)
    groups[OVERALL] = results
    summaries = {}
    for dataset, group in groups.items():
        loss = sum(result.loss_sum for result in group) / max(sum(result.tokens for result in group), 1)
        scores = score_corpus([result.answer for result in group], [result.reference for result in group])
        summaries[dataset] = Summary(len(group), loss, math.exp(loss), scores)
    return summaries

