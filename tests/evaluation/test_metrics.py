"""Generation metrics on answers whose scores are worked out by hand (in the comments)."""

from __future__ import annotations

import pytest

from internvl.evaluation.metrics import exact_match, normalize, score_answer, score_corpus


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Rouge.", "rouge", True),  # case and a trailing full stop
        ("  the  red\tcar! ", "the red car", True),  # whitespace runs and "!"
        ("«Élève»", "élève", True),  # Unicode punctuation and capitals
        ("it's red", "its red", False),  # punctuation becomes a space, so "it s" is not "its"
        ("rouge", "rouge foncé", False),
    ],
)
def test_exact_match_compares_lowercased_answers_without_punctuation(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


def test_normalize_turns_punctuation_into_spaces_and_collapses_them():
    assert normalize(" Le carré,  ROUGE! ") == "le carré rouge"


def test_bleu_of_one_word_answers_counts_the_orders_they_have():
    # Unigrams only (no answer has a bigram): 2 of 3 right, brevity penalty 1 -> 66.67. Plain BLEU-4 would be 0.
    scores = score_corpus(["rouge", "bleu", "vert"], ["rouge", "bleu", "jaune"])
    assert scores.bleu == pytest.approx(200 / 3)
    assert scores.exact_match == pytest.approx(200 / 3)


def test_bleu_4_of_a_sentence_is_the_geometric_mean_of_its_precisions():
    # "a b c d e" against "a b c d f": 1- to 4-gram precisions 4/5, 3/4, 2/3, 1/2; same length, no penalty.
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert score_answer("a b c d e", "a b c d f").bleu == pytest.approx(expected)
    assert score_corpus(["a b c d e"], ["a b c d f"]).bleu == pytest.approx(expected)


def test_chrf_of_a_short_answer():
    # "red" against "rouge", character n-grams of the orders "red" has (1-3): 1-grams r, e match (P 2/3, R 2/5),
    # no 2- or 3-gram does. Averages P = 2/9, R = 2/15; F-beta with beta 2: 5PR / (4P + R).
    precision, recall = 2 / 9, 2 / 15
    expected = 100 * 5 * precision * recall / (4 * precision + recall)
    assert score_answer("red", "rouge").chrf == pytest.approx(expected)


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence_of_unicode_words():
    # "the red square" against "the blue square": LCS "the square", P = R = 2/3.
    assert score_answer("the red square", "the blue square").rouge_l == pytest.approx(200 / 3)
    # "élève" is one word (rouge-score's own tokenizer makes it "l ve", and would score 2/3 here): LCS 1 of 2.
    assert score_answer("élève rouge", "élève bleu").rouge_l == pytest.approx(50)
    assert score_answer("红色", "红色").rouge_l == pytest.approx(100)  # its own tokenizer: empty, 0


def test_a_right_answer_scores_100_everywhere_and_a_wrong_one_0():
    right, wrong = score_answer("rouge", "rouge"), score_answer("bleu", "rouge")
    assert right.as_dict() == pytest.approx({"exact_match": 100, "bleu": 100, "chrf": 100, "rouge_l": 100})
    assert (wrong.exact_match, wrong.bleu, wrong.rouge_l) == (0, 0, 0)


def test_only_exact_match_normalises_bleu_and_chrf_score_the_text_as_written():
    scores = score_answer("Rouge.", "rouge")  # sacrebleu's defaults: case and punctuation count
    assert scores.exact_match == 100 and scores.bleu == 0 and scores.chrf < 100


def test_corpus_scores_need_one_prediction_per_reference():
    with pytest.raises(ValueError, match="as many predictions as references"):
        score_corpus(["rouge"], ["rouge", "bleu"])
