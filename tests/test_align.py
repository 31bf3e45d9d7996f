"""trl's DPO and GRPO on our videos (stages/training/align.py), through the real trl trainers and tiny models of real
families."""
import copy

import pytest
import torch
from transformers import AutoProcessor
from trl import DPOConfig, GRPOConfig

from stages.common.files import read_jsonl
from stages.data.frames import load_frames
from stages.models import vlm
from stages.training import align
from tests.helpers import TINY_VLM


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def tiny(request, small_data, tmp_path_factory):
    """A tiny model of the family, its processor, and the small workspace's train rows plus one that has two videos
    and two turns."""
    fam = vlm.family(request.param)
    rows = read_jsonl(small_data / "data/manifest/train.jsonl")
    texts = [m["content"].replace(vlm.VIDEO, "") for row in rows for m in row["messages"]] + [rows[0]["rejected"]]
    path = fam.build_tiny(TINY_VLM, texts, 32, tmp_path_factory.mktemp(request.param) / "base")
    second = rows[1]["videos"][0]
    two = {**rows[0], "id": "two-videos", "videos": [rows[0]["videos"][0], second],
           "messages": [{"role": "user", "content": "<video>\nWhat moves here?"},
                        {"role": "assistant", "content": "a square"},
                        {"role": "user", "content": "<video>\nAnd here?"},
                        {"role": "assistant", "content": rows[1]["target"]}],
           "target": rows[1]["target"], "rejected": rows[1]["rejected"]}
    return {"fam": fam, "path": str(path), "processor": AutoProcessor.from_pretrained(path),
            "rows": [*rows, two], "frames": small_data / "data/frames"}


def dpo_trainer(tiny, tmp_path, beta=0.1):
    torch.manual_seed(0)
    model, reference = (vlm.load_model(tiny["fam"], tiny["path"]) for _ in range(2))
    with torch.no_grad():   # the policy moved away from its reference, as after some DPO steps
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, report_to="none", use_cpu=True,
                     remove_unused_columns=False, gradient_checkpointing=None, activation_checkpointing=False)
    collator = align.PairCollator(tiny["rows"], tiny["processor"], tiny["fam"], 1024, tiny["frames"])
    trainer = align.VideoDPOTrainer(model=model, ref_model=reference, args=args, data_collator=collator,
                                    train_dataset=align.row_dataset(tiny["rows"]), processing_class=tiny["processor"])
    return trainer, collator, model, reference


def completion_log_prob(model, batch) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens of each sequence, computed from the logits by hand."""
    inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1]
    tokens = batch["input_ids"][:, 1:]
    per_token = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(1)


def test_dpo_loss_matches_a_hand_computation_from_policy_and_reference_log_probs(tiny, tmp_path):
    beta = 0.1
    trainer, collator, model, reference = dpo_trainer(tiny, tmp_path, beta)
    batch = collator([{"index": 0}])
    policy_chosen, policy_rejected = completion_log_prob(model, batch)
    reference_chosen, reference_rejected = completion_log_prob(reference, batch)
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    expected = -torch.nn.functional.logsigmoid(beta * margin)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_a_pair_of_a_multi_video_multi_turn_row_differs_only_in_its_final_answer(tiny, tmp_path):
    trainer, collator, model, _ = dpo_trainer(tiny, tmp_path)
    row = tiny["rows"][-1]
    batch = collator([{"index": len(tiny["rows"]) - 1}])
    tokenizer = tiny["processor"].tokenizer
    chosen, rejected = (tokenizer.decode(ids[mask.bool()]) for ids, mask in
                        zip(batch["input_ids"], batch["completion_mask"]))
    end = tokenizer.eos_token
    assert (chosen, rejected) == (row["target"] + end, row["rejected"] + end)   # not the earlier answer "a square"
    media = {key: value for key, value in batch.items() if key not in (*vlm.SEQUENCE_KEYS, "completion_mask")}
    one_side = vlm.encode(row, load_frames(row, tiny["frames"]), tiny["processor"], tiny["fam"], 1024)
    for key, value in media.items():   # both sides carry both videos
        assert value.shape[0] == 2 * one_side[key].shape[0], key
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_grpo_advantages_are_normalised_within_each_prompts_group(tiny, tmp_path):
    """Two prompts (one with two videos) x 4 sampled answers; each answer's advantage is its reward minus its group's
    mean over its group's standard deviation, whatever the other group's rewards are."""
    seen = []

    def length(prompts, completions, index, **_):
        rewards = [float(len(answer)) for answer in completions]
        seen.extend(rewards)
        return rewards

    rows = [tiny["rows"][0], tiny["rows"][-1]]
    model = vlm.load_model(tiny["fam"], tiny["path"])
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, beta=0.04,
                      max_completion_length=6, report_to="none", use_cpu=True, remove_unused_columns=False,
                      gradient_checkpointing=None, activation_checkpointing=False, seed=0,
                      generation_kwargs={"suppress_tokens": align.media_token_ids(model.config)})
    trainer = align.VideoGRPOTrainer(model=model, args=args, reward_funcs=[length],
                                     train_dataset=align.row_dataset(rows), processing_class=tiny["processor"],
                                     prompt_rows=rows, fam=tiny["fam"], frames_dir=tiny["frames"])
    dataset = trainer.train_dataset
    inputs = [dataset[0]] * 4 + [dataset[1]] * 4
    output = trainer._generate_and_score_completions(copy.deepcopy(inputs))

    rewards = torch.tensor(seen).view(2, 4)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(output["advantages"], expected.flatten(), atol=1e-5)
    completions = output["completion_ids"][output["completion_mask"].bool()]
    assert not set(completions.tolist()) & set(align.media_token_ids(model.config))
    assert [sample["input_ids"].shape[0] for sample in output["media"]] == [
        len(ids) for ids in trainer._tokenize_prompts(None)[0]]

    loss = trainer._compute_loss(model, output)   # the log-prob forward with each sample's own videos
    loss.backward()
    assert torch.isfinite(loss)
