"""The align_vlm stage on the small trained workspace: method none, DPO and GRPO from the SFT model, what evaluate and
push then take, kill and resume, and the errors that stop it before any work."""
import json
import shutil
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from stages import align_vlm, evaluate
from stages.common.files import read_jsonl, write_jsonl
from stages.models import vlm
from stages.training.align import pair
from stages.training.trainer import CHECKPOINTS, final_output
from tests.helpers import SMALL, kill_after_checkpoint, read_curve, write_params

SHORT = {"max_steps": 6, "eval_every": 3, "batch_size": 4, "save_steps": 0}


@pytest.fixture
def sft(trained_workspace):
    """The workspace after train_vlm's 8 steps: a weak SFT model to align."""
    return trained_workspace


def align(folder, **settings):
    write_params(folder, {**SMALL, "align_vlm": {**SHORT, **settings}})
    align_vlm.main()
    return json.loads((folder / "models/vlm_aligned/training.json").read_text())


def test_method_none_trains_nothing_and_the_sft_model_stays_the_one_evaluated(sft):
    assert align(sft, method="none")["method"] == "none"
    assert sorted(p.name for p in (sft / "models/vlm_aligned").iterdir()) == ["training.json"]
    assert json.loads((sft / "dvclive/align_vlm/metrics.json").read_text()) == {"method": "none"}
    assert final_output(sft / "models", "vlm") == sft / "models/vlm"


def test_dpo_starts_from_the_sft_model_and_evaluate_scores_both(sft):
    training = align(sft, method="dpo")
    assert (training["method"], training["base_model"], training["global_step"]) == ("dpo", "models/vlm/model", 6)
    sft_weights, aligned = (load_file(sft / f"models/{name}/model/model.safetensors")
                            for name in ("vlm", "vlm_aligned"))
    assert any(not torch.equal(sft_weights[key], aligned[key]) for key in sft_weights)
    # held-out preference accuracy and margin, at each evaluation
    accuracy = read_curve(sft / "dvclive/align_vlm/plots/metrics/eval/rewards/accuracies.tsv")
    assert [step for step, _ in accuracy] == [3, 6]
    assert read_curve(sft / "dvclive/align_vlm/plots/metrics/train/rewards/margins.tsv")

    evaluate.main()
    metrics = json.loads((sft / "eval/metrics.json").read_text())
    assert set(metrics) == {"seq2seq", "seq2seq_untrained", "vlm", "vlm_untrained", "vlm_sft"}
    predictions = read_jsonl(sft / "eval/predictions.jsonl")
    assert {p["model"] for p in predictions} >= {"vlm", "vlm_sft"}


def test_grpo_logs_each_reward_and_the_kl_and_takes_a_users_reward(sft):
    training = align(sft, method="grpo", grpo={"rewards": ["attribute", "rewards.brevity:score"], "reward_weights": [],
                                               "num_generations": 4, "temperature": 1.0, "max_new_tokens": 8,
                                               "mask_truncated": True})
    assert training["method"] == "grpo" and training["global_step"] == 6
    curves = sft / "dvclive/align_vlm/plots/metrics/train"
    for name in ("rewards/attribute/mean.tsv", "rewards/rewards.brevity:score/mean.tsv", "kl.tsv", "reward.tsv"):
        assert read_curve(curves / name), name


def test_dpo_without_preference_pairs_stops_before_any_work_saying_where_pairs_come_from(sft):
    for split in ("train", "val"):
        rows = read_jsonl(sft / f"data/manifest/{split}.jsonl")
        write_jsonl(sft / f"data/manifest/{split}.jsonl",
                    [{key: value for key, value in row.items() if key != "rejected"} for row in rows])
    with pytest.raises(SystemExit, match=r"method dpo needs preference pairs, and data/manifest/train.jsonl has none"):
        align(sft, method="dpo")
    assert not (sft / "models/vlm_aligned").exists()


def test_an_sft_adapter_without_a_merged_model_is_refused_with_the_key_that_fixes_it(sft):
    shutil.move(sft / "models/vlm/model", sft / "models/vlm/adapter")
    with pytest.raises(SystemExit, match=r"set train_vlm.merge_lora: true"):
        align(sft, method="dpo")


def test_a_pair_over_the_token_budget_is_left_out_with_one_record_for_its_longer_side(sft):
    processor, fam = AutoProcessor.from_pretrained(sft / "models/vlm/model"), vlm.family("llava")
    rows = read_jsonl(sft / "data/manifest/train.jsonl") + read_jsonl(sft / "data/manifest/val.jsonl")
    sides = defaultdict(list)   # every answer's token count, by row
    for record in vlm.over_budget([side for row in rows for side in pair(row)], processor, fam, 0):
        sides[record["id"]].append(record["tokens"])
    limit = max(min(counts) for counts in sides.values()) - 1     # both answers of some pairs are over it
    training = align(sft, method="dpo", max_length=limit)
    rejects = read_jsonl(sft / "models/vlm_aligned/rejects.jsonl")
    over = {row_id: max(counts) for row_id, counts in sides.items() if max(counts) > limit}
    assert sorted((r["id"], r["tokens"]) for r in rejects) == sorted(over.items())
    assert len(rejects) == training["rejected"]
    assert any(min(sides[row_id]) > limit for row_id in over)


def test_a_killed_dpo_run_resumes_from_its_last_checkpoint(sft):
    write_params(sft, {**SMALL, "align_vlm": {**SHORT, "method": "dpo", "max_steps": 40, "save_steps": 4,
                                              "eval_every": 20}})
    saved = kill_after_checkpoint("align_vlm", sft)
    assert not (sft / "models/vlm_aligned").exists()

    align_vlm.main()
    training = json.loads((sft / "models/vlm_aligned/training.json").read_text())
    assert int(training["resumed_from"].removeprefix("checkpoint-")) >= saved and training["global_step"] == 40
    assert not CHECKPOINTS.exists()
