import json

from stages.common.files import read_jsonl

MODELS = ("seq2seq", "seq2seq_untrained", "vlm", "vlm_untrained")


def test_metrics_for_both_models_and_their_untrained_twins(trained):
    metrics = json.loads((trained / "eval/metrics.json").read_text())
    assert set(metrics) == set(MODELS)
    for scores in metrics.values():
        assert {"bleu", "rouge_l", "cider_d", "meteor", "exact_match", "attribute_accuracy", "color_accuracy",
                "shape_accuracy", "direction_accuracy"} <= set(scores)
        assert 0 <= scores["attribute_accuracy"] <= 1 and 0 <= scores["bleu"] <= 100


def test_predictions_hold_one_line_per_model_and_test_sample(trained):
    test = read_jsonl(trained / "data/manifest/test.jsonl")
    predictions = read_jsonl(trained / "eval/predictions.jsonl")
    assert len(predictions) == len(MODELS) * len(test)
    assert {(p["model"], p["id"]) for p in predictions} == {(m, row["id"]) for m in MODELS for row in test}
    references = {row["id"]: row["target"] for row in test}
    assert all(p["reference"] == references[p["id"]] for p in predictions)


def test_comparison_table_has_a_bar_per_metric_and_model(trained):
    lines = (trained / "eval/comparison.csv").read_text().splitlines()
    assert lines[0] == "entry,score"
    entries = dict(line.rsplit(",", 1) for line in lines[1:])
    assert "attribute_accuracy / vlm" in entries and "bleu / seq2seq_untrained" in entries
    metrics = json.loads((trained / "eval/metrics.json").read_text())
    assert float(entries["attribute_accuracy / vlm"]) == round(100 * metrics["vlm"]["attribute_accuracy"], 2)
    assert float(entries["meteor / vlm"]) == metrics["vlm"]["meteor"] and "cider_d / vlm" not in entries
    cider = dict(line.rsplit(",", 1) for line in (trained / "eval/cider_d.csv").read_text().splitlines()[1:])
    assert {float(cider[f"cider_d / {m}"]) for m in MODELS} == {metrics[m]["cider_d"] for m in MODELS}
