"""How close generated answers are to the references: exact match, and BLEU, chrF and ROUGE-L from their libraries.

Every score is on a 0-100 scale. BLEU and chrF are sacrebleu's, ROUGE-L rouge-score's; none is re-implemented here,
so the figures mean what they mean in papers: BLEU and chrF score the text as generated (case and punctuation
count, sacrebleu's defaults); only exact match normalises. Two choices are ours, both for the short answers VQA
data has:
- BLEU uses sacrebleu's `effective_order`: n-gram orders no answer is long enough to have are left out. Plain
  BLEU-4 scores a corpus of one-word answers 0 even when every answer is right.
- ROUGE-L scores Unicode word tokens (lowercased `\\w+` runs). rouge-score's own tokenizer keeps only ASCII letters
  and digits, which would make "élève" "l ve" and a Chinese answer empty.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass

from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF

_WORDS = re.compile(r"\w+")


def normalize(text: str) -> str:
    """The form answers are compared in for exact match: lowercased, every Unicode punctuation character (category
    P*) turned into a space, runs of whitespace collapsed to one space, stripped. "Rouge." and " rouge" match."""
    text = "".join(" " if unicodedata.category(char).startswith("P") else char for char in text.lower())
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the two are equal after `normalize`."""
    return normalize(prediction) == normalize(reference)


class _WordTokenizer:
    """rouge-score's tokenizer interface over Unicode words (see the module docstring)."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


_ROUGE = RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
_BLEU = BLEU(effective_order=True)
_CHRF = CHRF()


@dataclass(frozen=True)
class Scores:
    """Generation scores of one answer or of a set of answers, each 0-100."""

    exact_match: float
    bleu: float
    chrf: float
    rouge_l: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _rouge_l(prediction: str, reference: str) -> float:
    return 100.0 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def score_answer(prediction: str, reference: str) -> Scores:
    """One answer's scores: sentence-level BLEU and chrF, ROUGE-L F1, exact match (100 or 0)."""
    return Scores(
        exact_match=100.0 * exact_match(prediction, reference),
        bleu=_BLEU.sentence_score(prediction, [reference]).score,
        chrf=_CHRF.sentence_score(prediction, [reference]).score,
        rouge_l=_rouge_l(prediction, reference),
    )


def score_corpus(predictions: list[str], references: list[str]) -> Scores:
    """A set of answers' scores: corpus BLEU and chrF (as sacrebleu reports them for a test set), the mean ROUGE-L
    F1 and the share of exact matches."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one: got {len(predictions)} and "
                         f"{len(references)}")
    count = len(predictions)
    return Scores(
        exact_match=100.0 * sum(map(exact_match, predictions, references)) / count,
        bleu=_BLEU.corpus_score(predictions, [references]).score,
        chrf=_CHRF.corpus_score(predictions, [references]).score,
        rouge_l=sum(map(_rouge_l, predictions, references)) / count,
    )
