import functools

import pytest

from stages.results import metrics
from stages.results.metrics import (
    attribute_accuracy,
    bleu,
    caption_scores,
    cider_d,
    coco_tokens,
    exact_match,
    meteor,
    read_attributes,
    rouge_l,
)

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
        "bleu", "rouge_l", "cider_d", "meteor", "exact_match", "color_accuracy", "shape_accuracy",
        "direction_accuracy", "attribute_accuracy"}
    assert set(caption_scores(["x"], [{"target": "y"}])) == {"bleu", "rouge_l", "cider_d", "meteor", "exact_match"}


REFS = ["a red circle moves left", "a blue square moves up", "a green triangle moves down"]


def test_cider_d_is_coco_captions_cider_d_times_100():
    assert coco_tokens("A red circle, moving LEFT.\n") == "a red circle moving left"
    assert cider_d(REFS, REFS) == pytest.approx(1000)           # 10 per caption with a single reference
    assert cider_d(["zzz qqq", "", "xx"], REFS) == 0
    near = cider_d(["a red circle moves right", "a blue square moves up", "a green circle moves down"], REFS)
    assert 0 < near < 1000
    # the Gaussian length penalty of CIDEr-D: the same words said twice score lower
    assert cider_d([r + " " + r for r in REFS], REFS) < cider_d(REFS, REFS) / 2


def test_meteor_runs_the_meteor_1_5_jar_on_the_wheels_java(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")                       # no system java needed
    monkeypatch.setattr(metrics, "_meteor", functools.cache(metrics._meteor.__wrapped__))
    assert meteor(REFS, REFS) == pytest.approx(100)
    assert meteor(["zzz", "qqq", ""], REFS) == 0
    # METEOR matches stems and synonyms, unlike BLEU: "moving" for "moves" still counts
    stem = meteor(["a red circle moving left"], ["a red circle moves left"])
    assert 60 < stem < 100 and stem > meteor(["a red circle jumps left"], ["a red circle moves left"])

