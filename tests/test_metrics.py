import pytest

from stages.metrics import attribute_accuracy, bleu, caption_scores, exact_match, read_attributes, rouge_l

TRUTHS = [{"color": "red", "shape": "circle", "direction": "left"},
          {"color": "blue", "shape": "square", "direction": "up"}]


def test_perfect_and_useless_captions():
    refs = ["a red circle moves left", "a blue square moves up"]
    assert bleu(refs, refs) == pytest.approx(100)
    assert rouge_l(refs, refs) == pytest.approx(100)
    assert bleu(["zzz", "qqq"], refs) < 1 and rouge_l(["zzz", "qqq"], refs) == 0
    assert exact_match(["A red circle moves left ", "x"], refs) == 0.5


def test_attributes_are_read_back_from_the_caption():
    vocabulary = {"color": {"red", "blue"}, "shape": {"circle", "square"}}
    assert read_attributes("A Red square, moving.", vocabulary) == {"color": "red", "shape": "square"}
    assert read_attributes("nothing here", vocabulary) == {"color": None, "shape": None}
    scores = attribute_accuracy(["a red square moves left", "a blue square moves down"], TRUTHS)
    assert scores == {"color_accuracy": 1.0, "shape_accuracy": 0.5, "direction_accuracy": 0.5,
                      "attribute_accuracy": pytest.approx(2 / 3)}


def test_caption_scores_add_attributes_only_when_known():
    rows = [{"target": "a red circle moves left", "attributes": TRUTHS[0]}]
    assert set(caption_scores(["a red circle moves left"], rows)) == {
        "bleu", "rouge_l", "exact_match", "color_accuracy", "shape_accuracy", "direction_accuracy",
        "attribute_accuracy"}
    assert set(caption_scores(["x"], [{"target": "y"}])) == {"bleu", "rouge_l", "exact_match"}
