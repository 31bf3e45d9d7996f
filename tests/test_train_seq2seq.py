import json

import pytest
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from stages import train_seq2seq
from tests.helpers import read_curve, write_params


def test_trains_the_tiny_model_and_saves_it_loadable_by_path(workspace):
    train_seq2seq.main()
    training = json.loads((workspace / "models/seq2seq/training.json").read_text())
    assert training["base_model"] == "models/seq2seq/base" and training["global_step"] == 8
    assert training["params"]["model"] == "tiny"
    for path in ("models/seq2seq/model", training["base_model"]):
        AutoTokenizer.from_pretrained(path)
        assert AutoModelForSeq2SeqLM.from_pretrained(path).config.model_type == "m2m_100"
    curve = read_curve(workspace / "dvclive/train_seq2seq/plots/metrics/train/loss.tsv")
    assert [step for step, _ in curve] == list(range(1, 9))    # x axis is the optimizer step
    assert curve[-1][1] < curve[0][1]
    assert (workspace / "dvclive/train_seq2seq/plots/metrics/eval/loss.tsv").exists()
    assert not (workspace / "dvc.yaml").exists()                 # dvclive must not write its own dvc.yaml


def test_a_source_over_the_length_budget_is_an_error_naming_the_sample(workspace):
    write_params(workspace, {"train_seq2seq": {"max_source_length": 4}})
    with pytest.raises(SystemExit, match=r"sample synthetic-\d+: source has \d+ tokens, above "
                                         r"train_seq2seq\.max_source_length=4"):
        train_seq2seq.main()
    assert not (workspace / "models/seq2seq").exists()
