"""The shared schedule (stages/training/schedule.py) through the real Trainer and the real train_seq2seq stage: epochs
or steps, the best checkpoint by a validation metric, early stopping, and a resume that keeps the selection.

A run made to overfit: the val captions are shuffled among the val rows, so once the model is sure of the true
caption its val loss rises again (measured: lowest at step 100 of 300, at learning rate 0.01)."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)

from stages import train_seq2seq
from stages.common.files import read_jsonl, write_jsonl
from stages.common.params import load, seed_everything
from stages.models import tiny
from stages.training import schedule
from stages.training.trainer import training_arguments
from tests.helpers import SMALL, kill_after_checkpoint, read_curve, write_params

OVERFIT = {"max_steps": 300, "eval_every": 20, "learning_rate": 0.01, "save_steps": 0}
VAL = Path("data/manifest/val.jsonl")


def overfit(workspace: Path, **overrides) -> dict:
    """Shuffle the val captions and write params for an overfitting train_seq2seq run; its params block."""
    rows = read_jsonl(workspace / VAL)
    targets = [row["target"] for row in rows]
    random.Random(0).shuffle(targets)
    write_jsonl(workspace / VAL, [{**row, "target": target} for row, target in zip(rows, targets)])
    write_params(workspace, {**SMALL, "train_seq2seq": {**SMALL["train_seq2seq"], **OVERFIT, **overrides}})
    return load("train_seq2seq", workspace / "params.yaml")["train_seq2seq"]


def selection_and_weights(workspace: Path) -> tuple[dict, bytes]:
    """train_seq2seq's selection record and its saved weights."""
    record = json.loads((workspace / "models/seq2seq/training.json").read_text())
    return record["selection"], (workspace / "models/seq2seq/model/model.safetensors").read_bytes()


def test_keep_best_returns_the_weights_of_the_best_evaluation_bit_for_bit_and_retention_keeps_that_checkpoint(
        workspace, tmp_path):
    p = overfit(workspace, max_steps=160)
    seed_everything(0)
    tiny.build_seq2seq(p["tiny"], [r[k] for r in read_jsonl(Path("data/manifest/train.jsonl"))
                                   for k in ("source", "target")], tmp_path / "base")
    tokenizer, model = AutoTokenizer.from_pretrained(tmp_path / "base"), AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "base")
    args = training_arguments(p, 0, str(tmp_path / "checkpoints"), Seq2SeqTrainingArguments)
    trainer = schedule.ScoredSeq2SeqTrainer(
        model=model, args=args, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        train_dataset=train_seq2seq.encode(read_jsonl(Path("data/manifest/train.jsonl")), tokenizer, p),
        eval_dataset=train_seq2seq.encode(read_jsonl(VAL), tokenizer, p),
        callbacks=[*schedule.callbacks(p), last := LastWeights()])
    trainer.train()

    kept = schedule.selection(trainer.state, trainer.args)
    best = min(kept["evaluations"], key=lambda e: e["score"])
    assert (kept["step"], kept["score"]) == (best["step"], best["score"]) and kept["step"] < 160
    # rotation (save_total_limit 1) never deleted the best checkpoint; the Trainer drops the others at the end
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == [f"checkpoint-{kept['step']}"]
    saved = load_file(tmp_path / "checkpoints" / f"checkpoint-{kept['step']}" / "model.safetensors")
    weights = trainer.model.state_dict()
    assert all(torch.equal(weights[name], tensor) for name, tensor in saved.items())
    assert not all(torch.equal(last.weights[name], tensor) for name, tensor in saved.items())


class LastWeights(TrainerCallback):
    """A copy of the weights after the last step, before the Trainer loads the best ones back."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == state.max_steps:
            self.weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_early_stopping_stops_at_the_evaluation_patience_after_the_best(workspace):
    overfit(workspace, early_stopping_patience=2)
    train_seq2seq.main()
    kept, _ = selection_and_weights(workspace)
    record = json.loads((workspace / "models/seq2seq/training.json").read_text())
    after = [e["score"] for e in kept["evaluations"] if e["step"] > kept["step"]]
    assert kept["stopped_early"] and len(after) == 2 and min(after) >= kept["score"]
    assert record["global_step"] == kept["step"] + 2 * OVERFIT["eval_every"] < OVERFIT["max_steps"]
    # dvclive has the selection metric at every evaluation, and the plot of the kept step
    curve = read_curve(workspace / "dvclive/train_seq2seq/plots/metrics/eval/loss.tsv")
    assert [step for step, _ in curve] == [e["step"] for e in kept["evaluations"]]
    marked = json.loads((workspace / "dvclive/train_seq2seq/plots/custom/kept.json").read_text())
    assert marked == [{"step": kept["step"], "score": kept["score"], "metric": "loss", "keep": "best"}]


def test_epochs_and_steps_that_describe_the_same_schedule_train_identical_models(workspace):
    train_rows = len(read_jsonl(Path("data/manifest/train.jsonl")))
    steps_per_epoch = -(-train_rows // SMALL["train_seq2seq"]["batch_size"])
    results = []
    for length in ({"epochs": 3, "max_steps": 0, "eval_every": "epoch"},
                   {"epochs": 0, "max_steps": 3 * steps_per_epoch, "eval_every": steps_per_epoch}):
        write_params(workspace, {**SMALL, "train_seq2seq": {**SMALL["train_seq2seq"], **length}})
        train_seq2seq.main()
        results.append(selection_and_weights(workspace))
    assert results[0] == results[1] and len(results[0][0]["evaluations"]) == 3


def test_a_killed_run_resumes_and_keeps_the_best_it_found_before_the_kill(workspace):
    overfit(workspace)
    train_seq2seq.main()
    expected = selection_and_weights(workspace)
    for output in ("models", "dvclive"):
        shutil.rmtree(workspace / output)

    # killed only once the best step is behind it: the resumed run must not forget it
    saved = kill_after_checkpoint("train_seq2seq", workspace, after=expected[0]["step"])

    train_seq2seq.main()
    record = json.loads((workspace / "models/seq2seq/training.json").read_text())
    assert int(record["resumed_from"].removeprefix("checkpoint-")) >= saved > expected[0]["step"]
    assert selection_and_weights(workspace) == expected


@pytest.mark.parametrize("length, named", [
    ({"epochs": 2, "max_steps": 8}, "exactly one of train_seq2seq.epochs and train_seq2seq.max_steps"),
    ({"epochs": 0, "max_steps": 0}, "exactly one of train_seq2seq.epochs and train_seq2seq.max_steps"),
    ({"warmup_ratio": 0.1, "warmup_steps": 4}, "at most one of train_seq2seq.warmup_ratio and "
                                               "train_seq2seq.warmup_steps"),
    ({"best_metric": "bleu4"}, "does not compute 'bleu4' on this data; it computes loss, bleu, rouge_l, cider_d, "
                               "meteor, exact_match, attribute_accuracy"),
])
def test_an_ill_defined_schedule_stops_before_any_work_naming_the_keys(workspace, length, named):
    write_params(workspace, {**SMALL, "train_seq2seq": {**SMALL["train_seq2seq"], **length}})
    with pytest.raises(SystemExit, match=named.replace(".", r"\.")):
        train_seq2seq.main()
    assert not (workspace / "models").exists()


def test_a_metric_that_needs_what_the_data_lacks_is_refused_listing_the_computed_ones(workspace):
    write_jsonl(VAL, [{k: v for k, v in row.items() if k != "attributes"} for row in read_jsonl(VAL)])
    write_params(workspace, {**SMALL, "train_seq2seq": {**SMALL["train_seq2seq"], "best_metric": "attribute_accuracy"}})
    with pytest.raises(SystemExit, match=r"does not compute 'attribute_accuracy' on this data; it computes loss, "
                                         r"bleu, rouge_l, cider_d, meteor, exact_match$"):
        train_seq2seq.main()


def test_a_generation_metric_selects_by_greedy_answers_and_higher_is_better(workspace):
    write_params(workspace, {**SMALL, "train_seq2seq": {**SMALL["train_seq2seq"], "max_steps": 12, "eval_every": 4,
                                                        "best_metric": "attribute_accuracy", "best_samples": 4}})
    train_seq2seq.main()
    kept, _ = selection_and_weights(workspace)
    scores = read_curve(workspace / "dvclive/train_seq2seq/plots/metrics/eval/attribute_accuracy.tsv")
    assert [step for step, _ in scores] == [4, 8, 12] and kept["greater_is_better"] is True
    assert all(0 <= score <= 1 for _, score in scores)
    first_best = next(step for step, score in scores if score == max(s for _, s in scores))
    assert (kept["step"], kept["score"]) == (first_best, max(s for _, s in scores))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_vlm_checkpoint_loads_back_for_keep_best_and_for_a_resume(small_data, tmp_path, family):
    """transformers saves these families under their hub key names; the Trainer's own plain load_state_dict matched
    none of them (and only warned), so `keep: best` kept the last weights and a resume went on from fresh ones."""
    from transformers import TrainingArguments

    from stages.models import vlm
    from tests.helpers import TINY_VLM

    fam = vlm.family(family)
    rows = read_jsonl(small_data / "data/manifest/train.jsonl")
    path = fam.build_tiny(TINY_VLM, [m["content"] for r in rows for m in r["messages"]], 32, tmp_path / "base")
    model = vlm.load_model(fam, str(path))
    trainer = schedule.ScoredTrainer(model=model, args=TrainingArguments(str(tmp_path / "out"), use_cpu=True,
                                                                         report_to="none"))
    trainer.save_model(tmp_path / "checkpoint-1")
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def changed_then(load):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        load()
        return all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())

    assert changed_then(lambda: trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1")))
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
    assert changed_then(trainer._load_best_model)
