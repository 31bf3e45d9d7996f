import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, SmolVLMForConditionalGeneration

from stages import embed, train_vlm
from stages.common.files import read_jsonl
from stages.common.params import load
from stages.models import vlm
from tests.helpers import SMALL, read_curve, write_params


def test_trains_the_tiny_llava_and_saves_it_loadable_by_path(workspace):
    train_vlm.main()
    training = json.loads((workspace / "models/vlm/training.json").read_text())
    assert training["base_model"] == "models/vlm/base" and training["family"] == "llava"
    assert training["global_step"] == 8
    for path in ("models/vlm/model", training["base_model"]):
        processor = AutoProcessor.from_pretrained(path)
        assert processor.chat_template and processor.tokenizer.eos_token == "<|end|>"
        assert LlavaForConditionalGeneration.from_pretrained(path).config.vision_config.image_size == 32
    curve = read_curve(workspace / "dvclive/train_vlm/plots/metrics/train/loss.tsv")
    assert len(curve) == 8 and curve[-1][1] < curve[0][1]


def test_lora_saves_an_adapter_and_a_merged_model_that_load_with_plain_transformers_and_agree(workspace):
    write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "family": "smolvlm", "finetune": "lora",
                                                   "merge_lora": True, "gradient_checkpointing": True,
                                                   "attn_implementation": "eager"}})
    train_vlm.main()
    fam = vlm.family("smolvlm")
    adapter = json.loads((workspace / "models/vlm/adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "models/vlm/base"   # the final place, not the scratch folder
    rows = read_jsonl(workspace / "data/manifest/test.jsonl")[:2]
    logits = {}
    for folder in ("models/vlm/adapter", "models/vlm/model"):
        processor = AutoProcessor.from_pretrained(folder)
        model = SmolVLMForConditionalGeneration.from_pretrained(folder).eval()
        inputs = vlm.generation_inputs(rows, processor, fam)
        with torch.no_grad():
            logits[folder] = model(**inputs).logits
            assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[0] == 2
    assert torch.allclose(*logits.values(), atol=1e-4)
    base = SmolVLMForConditionalGeneration.from_pretrained("models/vlm/base").eval()
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, logits["models/vlm/model"], atol=1e-4)  # it did train


def test_full_finetune_with_a_frozen_vision_tower_leaves_it_as_loaded(workspace):
    write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "freeze_vision": True}})
    train_vlm.main()
    base = LlavaForConditionalGeneration.from_pretrained("models/vlm/base").state_dict()
    trained = LlavaForConditionalGeneration.from_pretrained("models/vlm/model").state_dict()
    changed = {name for name in base if not torch.equal(base[name], trained[name])}
    assert changed and not any(name.startswith("model.vision_tower.") for name in changed)
    assert any(name.startswith("model.multi_modal_projector.") for name in changed)


def test_samples_over_the_token_budget_are_left_out_and_recorded_never_cut(workspace):
    processor_rows = read_jsonl(workspace / "data/manifest/train.jsonl") + read_jsonl(
        workspace / "data/manifest/val.jsonl")
    train_vlm.main()                           # builds the tiny processor; count every sample's tokens with it
    processor = AutoProcessor.from_pretrained("models/vlm/base")
    counts = {r["id"]: r["tokens"] for r in vlm.over_budget(processor_rows, processor, vlm.family("llava"), 0)}
    limit = max(counts.values()) - 1
    write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "max_length": limit}})
    train_vlm.main()
    rejects = read_jsonl(workspace / "models/vlm/rejects.jsonl")
    assert {r["id"] for r in rejects} == {i for i, n in counts.items() if n > limit} and rejects
    assert all(r["reason"] == "over_token_budget" and r["tokens"] > limit == r["max_length"] for r in rejects)
    assert json.loads((workspace / "models/vlm/training.json").read_text())["rejected"] == len(rejects)

    write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "max_length": min(counts.values()) - 1}})
    with pytest.raises(SystemExit, match=r"every train or val sample is longer than train_vlm.max_length=\d+ tokens"):
        train_vlm.main()
    assert not (workspace / "models/vlm.partial").exists()


def test_lora_keeps_the_adapter_of_the_best_evaluation_by_a_generation_metric(workspace):
    write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "finetune": "lora", "eval_every": 4,
                                                   "best_metric": "cider_d", "best_samples": 4}})
    train_vlm.main()
    selection = json.loads((workspace / "models/vlm/training.json").read_text())["selection"]
    scores = read_curve(workspace / "dvclive/train_vlm/plots/metrics/eval/cider_d.tsv")
    assert [step for step, _ in scores] == [4, 8] and selection["greater_is_better"] is True
    best = max(score for _, score in scores)
    assert (selection["step"], selection["score"]) == (next(step for step, s in scores if s == best), best)
    assert (workspace / "models/vlm/adapter/adapter_model.safetensors").exists()


def test_packing_trains_qwen2_vl_along_the_loss_curve_of_padded_batches(workspace):
    curves = {}
    for packing in (False, True):
        write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "family": "qwen2_vl",
                                                       "packing": packing}})
        train_vlm.main()
        curves[packing] = read_curve(workspace / "dvclive/train_vlm/plots/metrics/train/loss.tsv")
    # the batches did pack: the 4 samples of a batch fit in fewer rows of max_length tokens
    processor = AutoProcessor.from_pretrained("models/vlm/base")
    rows = read_jsonl(workspace / "data/manifest/train.jsonl")[:4]
    lengths = [len(vlm.ManifestDataset(rows, processor, vlm.family("qwen2_vl"), 10_000)[i]["input_ids"])
               for i in range(4)]
    assert len(vlm.pack_rows(lengths, load("train_vlm")["train_vlm"]["max_length"])) < 4
    assert len(curves[True]) == len(curves[False]) == 8
    for (_, padded), (_, packed) in zip(curves[False], curves[True]):
        assert abs(padded - packed) < 1e-4, (curves[False], curves[True])


def test_the_vision_cache_trains_along_the_same_curve_to_the_same_weights_without_running_the_tower(workspace):
    runs = {}
    for cached in (False, True):
        write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "freeze_vision": True,
                                                       "cache_vision": cached}})
        if cached:
            embed.main()
        train_vlm.main()
        runs[cached] = (read_curve(workspace / "dvclive/train_vlm/plots/metrics/train/loss.tsv"),
                        LlavaForConditionalGeneration.from_pretrained("models/vlm/model").state_dict(),
                        json.loads((workspace / "models/vlm/training.json").read_text())["vision_cache"])
    (curve, weights, none), (cached_curve, cached_weights, counts) = runs[False], runs[True]
    assert none is None and counts["frames_through_tower"] == 0 and counts["frames_from_cache"] > 0
    assert len(curve) == len(cached_curve) == 8
    for (_, plain), (_, cached) in zip(curve, cached_curve):
        assert abs(plain - cached) < 1e-4, (curve, cached_curve)
    assert weights.keys() == cached_weights.keys()
    for name, weight in weights.items():
        assert torch.allclose(weight, cached_weights[name], atol=1e-4), name


def test_packing_stops_at_once_where_the_family_cannot_pack(workspace):
    write_params(workspace, {**SMALL, "train_vlm": {**SMALL["train_vlm"], "family": "instructblip_video",
                                                   "packing": True}})
    with pytest.raises(ValueError, match="instructblip_video cannot pack samples"):
        train_vlm.main()
    assert not (workspace / "models/vlm.partial").exists() and not (workspace / "models/vlm").exists()
