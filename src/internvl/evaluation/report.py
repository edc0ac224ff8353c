"""What an evaluation writes: a table, `report.json`, `answers.jsonl` and a bar chart, models side by side.

`answers.jsonl` holds one line per sample, with every model's answer to it beside the reference, so a reader sees
at once where the adapter answers differently from the base.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from internvl.evaluation.evaluate import OVERALL, SampleResult, Summary, summarize
from internvl.evaluation.settings import EvalSettings

REPORT = "report.json"
ANSWERS = "answers.jsonl"
CHART = "report.png"
_METRICS = {"exact_match": "exact match", "bleu": "BLEU", "chrf": "chrF", "rouge_l": "ROUGE-L"}


@dataclass
class Evaluated:
    """One model's results: `name` is "base" or the adapter folder."""

    name: str
    adapter: str | None
    results: list[SampleResult]
    summaries: dict[str, Summary] = field(init=False)

    def __post_init__(self):
        self.summaries = summarize(self.results)


def _shown_datasets(evaluated: list[Evaluated]) -> list[str]:
    """The datasets of the table, then `OVERALL` when there are several."""
    datasets = [name for name in evaluated[0].summaries if name != OVERALL]
    return datasets + [OVERALL] if len(datasets) > 1 else datasets


def format_table(evaluated: list[Evaluated]) -> str:
    """The models side by side, per dataset: samples, loss and perplexity on the answers, generation scores."""
    width = max(len("model"), *(len(item.name) for item in evaluated))
    datasets = _shown_datasets(evaluated)
    data_width = max(len("dataset"), *map(len, datasets))
    header = (f"{'dataset':<{data_width}}  {'model':<{width}}  samples    loss  perplexity  exact match"
              "   BLEU   chrF  ROUGE-L")
    lines = [header]
    for dataset in datasets:
        for item in evaluated:
            summary = item.summaries[dataset]
            scores = summary.scores
            lines.append(
                f"{dataset:<{data_width}}  {item.name:<{width}}  {summary.samples:>7}  {summary.loss:>6.3f}  "
                f"{summary.perplexity:>10.4g}  {scores.exact_match:>10.1f}%  {scores.bleu:>5.1f}  {scores.chrf:>5.1f}  "
                f"{scores.rouge_l:>7.1f}"
            )
    return "\n".join(lines)


def _answer_rows(evaluated: list[Evaluated]) -> list[dict]:
    """One row per sample: where it is, its question and reference, then each model's answer, scores and loss."""
    rows = []
    for position, first in enumerate(evaluated[0].results):
        row = {"dataset": first.dataset, "source": first.source, "question": first.question,
               "reference": first.reference}
        for item in evaluated:
            result = item.results[position]
            scores = {name: round(value, 2) for name, value in result.scores.as_dict().items()}
            row[item.name] = {"answer": result.answer, **scores, "loss": round(result.loss, 4)}
        rows.append(row)
    return rows


def write_chart(evaluated: list[Evaluated], path: str | os.PathLike, title: str) -> None:
    """Grouped bars of the overall generation scores (0-100) per model, and the models' answer losses beside."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib import pyplot as plt

    figure, (scores_axes, loss_axes) = plt.subplots(
        1, 2, figsize=(9, 4), dpi=100, gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.8 / len(evaluated)
    colours = plt.get_cmap("tab10").colors
    for i, item in enumerate(evaluated):
        overall = item.summaries[OVERALL]
        values = [getattr(overall.scores, metric) for metric in _METRICS]
        positions = [x + (i - (len(evaluated) - 1) / 2) * width for x in range(len(_METRICS))]
        bars = scores_axes.bar(positions, values, width, label=item.name, color=colours[i % len(colours)])
        scores_axes.bar_label(bars, fmt="%.0f", fontsize=8)
        loss_axes.bar([i], [overall.loss], 0.6, color=colours[i % len(colours)])
    scores_axes.set_xticks(range(len(_METRICS)), list(_METRICS.values()))
    scores_axes.set_ylim(0, 130)  # room above the bars for the legend
    scores_axes.set_yticks(range(0, 101, 20))
    scores_axes.set_ylabel("score (0-100)")
    scores_axes.legend(fontsize=8, loc="upper center", ncols=min(len(evaluated), 3))
    scores_axes.set_title(title, fontsize=10)
    loss_axes.set_xticks(range(len(evaluated)), [str(i + 1) for i in range(len(evaluated))])
    loss_axes.set_xlabel("model (as in the legend)")
    loss_axes.set_title("loss on the answers", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(output_dir: str | os.PathLike, settings: EvalSettings, base: str,
                 evaluated: list[Evaluated]) -> dict[str, Path]:
    """Write report.json, answers.jsonl and the chart into `output_dir`; returns their paths by kind."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "base": base,
        "settings": asdict(settings),
        "models": [
            {"name": item.name, "adapter": item.adapter,
             "results": {dataset: summary.as_dict() for dataset, summary in item.summaries.items()}}
            for item in evaluated
        ],
    }
    paths = {"report": output_dir / REPORT, "answers": output_dir / ANSWERS, "chart": output_dir / CHART}
    paths["report"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    with paths["answers"].open("w", encoding="utf-8") as lines:
        for row in _answer_rows(evaluated):
            lines.write(json.dumps(row, ensure_ascii=False) + "\n")
    samples = evaluated[0].summaries[OVERALL].samples
    write_chart(evaluated, paths["chart"], f"{Path(settings.meta_path).name}: {samples} samples")
    return paths
