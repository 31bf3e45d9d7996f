import copy
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipVideoConfig,
    LlavaForConditionalGeneration,
)

from stages.common.files import read_jsonl
from stages.models import vlm
from tests.helpers import REPO, TINY_VLM, frames, row_with

FAM = vlm.family("llava")


@pytest.fixture(scope="module")
def tiny_llava(small_data, tmp_path_factory):
    rows = read_jsonl(small_data / "data/manifest/train.jsonl")
    texts = [m["content"].replace(vlm.VIDEO, "") for row in rows for m in row["messages"]]
    path = FAM.build_tiny(TINY_VLM, texts, 32, tmp_path_factory.mktemp("llava") / "base")
    return AutoProcessor.from_pretrained(path), LlavaForConditionalGeneration.from_pretrained(path)


def labelled_text(processor, example):
    ids = example["input_ids"][example["labels"] != vlm.IGNORE]
    return processor.tokenizer.decode(ids)


def test_loss_is_on_the_assistant_answer_and_end_of_turn_only(tiny_llava):
    processor, _ = tiny_llava
    row = row_with([("system", "You describe clips."), ("user", "<video>\nDescribe the video."),
                    ("assistant", "a red circle moves left")])
    example = vlm.encode(row, frames(), processor, FAM, 256)
    assert labelled_text(processor, example) == "a red circle moves left<|end|>"
    image_positions = example["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_positions.sum() == 4 * 16                    # 4 frames x (32/8)^2 patches
    assert (example["labels"][image_positions] == vlm.IGNORE).all()
    assert example["pixel_values"].shape == (4, 3, 32, 32)


def test_every_assistant_turn_of_a_multi_turn_conversation_is_labelled(tiny_llava):
    processor, _ = tiny_llava
    row = row_with([("user", "<video>\nWhat moves?"), ("assistant", "a square"),
                    ("user", "And the second one? <video>"), ("assistant", "a blue circle moves up")], videos=2)
    example = vlm.encode(row, frames(2), processor, FAM, 512)
    assert labelled_text(processor, example) == "a square<|end|>a blue circle moves up<|end|>"
    assert example["pixel_values"].shape[0] == 8


def test_a_sample_over_the_token_budget_is_an_error_not_a_truncation(tiny_llava):
    processor, _ = tiny_llava
    row = row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle moves left")])
    with pytest.raises(ValueError, match=r"sample t: \d+ tokens, above train_vlm.max_length=32"):
        vlm.encode(row, frames(), processor, FAM, 32)


def test_generation_prompts_end_at_the_assistant_turn(tiny_llava, small_data):
    processor, model = tiny_llava
    rows = read_jsonl(small_data / "data/manifest/test.jsonl")[:3]
    inputs = vlm.generation_inputs(rows, processor, FAM, small_data / "data/frames")
    assert (inputs["attention_mask"][:, -1] == 1).all()      # left padding: every prompt ends the batch
    text = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    assert text.endswith("<|assistant|>\n") and rows[0]["target"] not in text
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[0] == 3


# Every family: the same guarantees through its own processor, chat template and media inputs.
END_OF_TURN = {"llava": "<|end|>", "smolvlm": "<end_of_utterance>", "qwen2_vl": "<|im_end|>",
               "qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "llava_onevision": "<|im_end|>",
               "llava_next_video": "<|end|>", "internvl": "<|im_end|>", "instructblip_video": "<|end|>"}
# SmolVLM's template writes "Assistant: answer": the space is fused into the answer's first token ("Ġa"), so it is
# labelled with it, and it is what the model generates after the "Assistant:" prompt.
ANSWER_START = {"smolvlm": " "}


@pytest.fixture(scope="module", params=list(vlm.FAMILIES))
def tiny_family(request, small_data, tmp_path_factory):
    fam = vlm.family(request.param)
    rows = read_jsonl(small_data / "data/manifest/train.jsonl")
    texts = [m["content"].replace(vlm.VIDEO, "") for row in rows for m in row["messages"]]
    path = fam.build_tiny(TINY_VLM, texts, 32, tmp_path_factory.mktemp(request.param) / "base")
    return request.param, fam, AutoProcessor.from_pretrained(path), vlm.load_model(fam, str(path))


def test_each_family_labels_exactly_every_assistant_turn(tiny_family):
    name, fam, processor, _ = tiny_family
    row = row_with([("system", "You describe clips."), ("user", "<video>\nWhat moves?"), ("assistant", "a square"),
                    ("user", "And here? <video>"), ("assistant", "a blue circle moves up")], videos=2)
    example = vlm.encode(row, frames(2), processor, fam, 1024)
    eot, start = END_OF_TURN[name], ANSWER_START.get(name, "")
    assert labelled_text(processor, example) == f"{start}a square{eot}{start}a blue circle moves up{eot}"


def test_each_family_trains_on_32_videos_in_a_sample_beside_a_1_video_sample(tiny_family):
    name, fam, processor, model = tiny_family
    many = row_with([("user", "<video>" * 32 + "\nWhich video shows a red circle?"), ("assistant", "the third")],
                    videos=32)
    one = row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle moves left")])
    examples = [vlm.encode(many, frames(32), processor, fam, 4096), vlm.encode(one, frames(), processor, fam, 4096)]
    assert labelled_text(processor, examples[0]) == f"{ANSWER_START.get(name, '')}the third{END_OF_TURN[name]}"
    batch = vlm.collate(examples, processor.tokenizer.pad_token_id)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for part in (fam.VISION, fam.PROJECTOR, fam.LANGUAGE):
        grads = [w.grad for w in model.get_submodule(part).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part


# Their models take [videos, frames, 3, h, w] (`pixel_values_videos`, InstructBLIP-Video's `pixel_values`): one frame
# count per batch (vlm.same_frame_count).
ONE_FRAME_COUNT_PER_BATCH = {"llava_onevision", "llava_next_video", "instructblip_video"}


def test_each_family_batches_samples_with_different_video_and_frame_counts(tiny_family):
    name, fam, processor, model = tiny_family
    count = 4 if name in ONE_FRAME_COUNT_PER_BATCH else 2
    one = vlm.encode(row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle")]), frames(),
                     processor, fam, 4096)
    two = vlm.encode(row_with([("user", "<video> then <video>: which moves?"), ("assistant", "the second one")],
                              videos=2, frames=count), frames(2, count), processor, fam, 4096)
    batch = vlm.collate([one, two], processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum() == len(one["input_ids"]) + len(two["input_ids"])
    loss = model(**batch).loss
    # the padded batch gives each sample the loss it has alone
    alone = [model(**vlm.collate([example], processor.tokenizer.pad_token_id)).loss for example in (one, two)]
    tokens = [(example["labels"] != vlm.IGNORE).sum() for example in (one, two)]
    expected = sum(loss_ * n for loss_, n in zip(alone, tokens)) / sum(tokens)
    assert torch.allclose(loss, expected, atol=1e-4), (loss, expected)


def test_each_family_gives_each_packed_sample_the_loss_and_gradients_it_has_unpacked(tiny_family):
    name, fam, processor, model = tiny_family
    if name == "instructblip_video":   # refused at once, with the reason
        with pytest.raises(ValueError, match="instructblip_video cannot pack samples: .* Q-Former"):
            vlm.check_packing(fam)
        return
    vlm.check_packing(fam)
    count = 4 if name in ONE_FRAME_COUNT_PER_BATCH else 2
    turns = [[("user", "<video>\nDescribe."), ("assistant", "a red circle")],
             [("user", "<video> then <video>: which moves?"), ("assistant", "the second one moves left")],
             [("system", "You describe clips."), ("user", "What is in <video>?"), ("assistant", "a square")]]
    examples = [vlm.encode(row_with(turn, videos=n, frames=count), frames(n, count), processor, fam, 4096)
                for turn, n in zip(turns, (1, 2, 1))]
    lengths = [len(example["input_ids"]) for example in examples]
    capacity = max(lengths[0] + lengths[2], lengths[1])   # two rows: the longest alone, the other two together
    rows = vlm.pack_rows(lengths, capacity)
    assert sorted(map(sorted, rows)) == [[0, 2], [1]]
    pad = processor.tokenizer.pad_token_id
    padded, packed = vlm.collate(examples, pad), vlm.collate(examples, pad, pack_length=capacity)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 2
    spans = {}
    for r, row in enumerate(rows):
        for i, start in zip(row, np.cumsum([0] + [lengths[i] for i in row])):
            spans[i] = (r, start, start + lengths[i])
            assert packed["position_ids"][r, start:start + lengths[i]].tolist() == list(range(lengths[i]))

    def per_sample(batch, where):
        """Each sample's mean token loss (over its own labels), the batch's loss, and the weights' gradients."""
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        losses = [torch.nn.functional.cross_entropy(out.logits[r, start:end - 1], batch["labels"][r, start + 1:end],
                                                    ignore_index=vlm.IGNORE) for r, start, end in where]
        grads = {key: w.grad.clone() for key, w in model.named_parameters() if w.grad is not None}
        return torch.stack(losses), out.loss, grads

    # random-init tiny models answer almost the same whatever the context; sharper weights make a leak across
    # samples show in the losses (the last check)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.mul_(5)
    handle = vlm.take_packed_rows(model)
    try:
        alone = per_sample(padded, [(i, 0, n) for i, n in enumerate(lengths)])
        together = per_sample(packed, [spans[i] for i in range(3)])
    finally:
        if handle is not None:
            handle.remove()
    assert torch.allclose(alone[0], together[0], atol=1e-4), (alone[0], together[0])
    assert torch.allclose(alone[1], together[1], atol=1e-4)
    assert alone[2].keys() == together[2].keys() and alone[2]
    for key, grad in alone[2].items():
        assert torch.allclose(grad, together[2][key], atol=1e-4), key
    # and without the mask that packing relies on, samples would see each other: the check above can fail
    leaked = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand(2, -1))
    leaked_losses = per_sample(leaked, [spans[i] for i in range(3)])[0]
    assert not torch.allclose(alone[0], leaked_losses, atol=1e-4)


def test_packing_puts_samples_longest_first_into_the_first_row_with_room():
    assert vlm.pack_rows([5, 3, 9, 2, 4], 10) == [[2], [0, 4], [1, 3]]
    assert vlm.pack_rows([12, 3], 10) == [[0], [1]]           # a sample over the capacity gets a row of its own
    assert vlm.pack_rows([3, 3, 3], 10) == [[0, 1, 2]]        # ties keep their order


@pytest.mark.parametrize("name", list(vlm.FAMILIES))
def test_each_family_takes_frames_whose_side_is_no_multiple_of_its_patch_grid(name, small_data, tmp_path):
    fam = vlm.family(name)
    base = fam.build_tiny(TINY_VLM, ["a red circle moves left"] * 50, 24, tmp_path / "base")  # 3 x 3 patches of 8 px
    processor, model = AutoProcessor.from_pretrained(base), fam.MODEL_CLASS.from_pretrained(base)
    row = row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle")])
    video = [np.random.default_rng(0).integers(0, 255, (4, 24, 24, 3), dtype=np.uint8)]
    batch = vlm.collate([vlm.encode(row, video, processor, fam, 4096)], processor.tokenizer.pad_token_id)
    assert torch.isfinite(model(**batch).loss)


def test_each_family_generates_from_a_batch_of_prompts(tiny_family, small_data):
    name, fam, processor, model = tiny_family
    rows = read_jsonl(small_data / "data/manifest/test.jsonl")[:2]
    inputs = vlm.generation_inputs(rows, processor, fam, small_data / "data/frames")
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[0] == 2 and output.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name", sorted(ONE_FRAME_COUNT_PER_BATCH))
def test_a_batch_of_different_frame_counts_is_refused_where_the_model_takes_one(name):
    fam = vlm.family(name)
    with tempfile.TemporaryDirectory() as folder:
        processor = AutoProcessor.from_pretrained(fam.build_tiny(TINY_VLM, ["a red circle"] * 50, 32, Path(folder)))
    examples = [vlm.encode(row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle")], frames=n),
                           frames(1, n), processor, fam, 4096) for n in (4, 2)]
    with pytest.raises(ValueError, match=r"videos of \[2, 4\] frames in one batch"):
        vlm.collate(examples, processor.tokenizer.pad_token_id)


# ---------------------------------------------------------------- the family contract and the registry

def test_every_registered_family_provides_what_the_contract_names():
    for name, module in vlm.FAMILIES.items():
        assert isinstance(module, vlm.Family), name
        assert vlm.family(name) is module


def test_the_params_schema_offers_exactly_the_registered_and_refused_families():
    schema = json.loads((REPO / "stages/schema/params/train_vlm.json").read_text())
    assert schema["properties"]["family"]["enum"] == list(vlm.FAMILIES)


def test_an_unknown_family_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown VLM family 'lava'; valid families: llava, smolvlm, .*internvl, "
                                         "instructblip_video$"):
        vlm.family("lava")


def test_a_checkpoint_of_another_family_is_refused_naming_both(tmp_path):
    base = vlm.family("llava").build_tiny(TINY_VLM, ["a red circle moves left"] * 50, 32, tmp_path / "base")
    with pytest.raises(ValueError, match="has model_type 'llava', but train_vlm.family 'qwen3_vl' expects 'qwen3_vl'"):
        vlm.load_model(vlm.family("qwen3_vl"), str(base))


# ---------------------------------------------------------------- frame times

# Frames that `extract` took at 1.0, 1.5, 2.0 and 2.5 s (2 per second, not from the clip's start), and what each
# family's processor makes of them. SmolVLM writes whole seconds per frame; Qwen3-VL the mean time of each frame
# pair (1.25 and 2.25 s, printed with one decimal); Qwen2.5-VL turns the rate into seconds per frame pair. The other
# families' models have no notion of time: the times must change nothing they see.
TIMES = [1.0, 1.5, 2.0, 2.5]
TIME_MARKS = {"smolvlm": ["Frame from 00:01", "Frame from 00:01", "Frame from 00:02", "Frame from 00:02"],
              "qwen3_vl": ["<1.2 seconds>", "<2.2 seconds>"]}


def test_each_family_shows_the_model_the_frame_times_extract_recorded(tiny_family):
    name, fam, processor, _ = tiny_family
    row = row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle")])
    timed = {**row, "videos": [{**row["videos"][0], "timestamps": TIMES}]}
    example = vlm.encode(timed, frames(), processor, fam, 4096)
    prompt = processor.tokenizer.decode(example["input_ids"])
    if name in TIME_MARKS:
        assert re.findall(r"Frame from \d\d:\d\d|<[\d.]+ seconds>", prompt) == TIME_MARKS[name], prompt
        if name == "qwen3_vl":   # each time, then its pair's tokens in one vision start/end, never nested in another
            assert re.findall(r"<[\d.]+ seconds><\|vision_start\|>", prompt) and prompt.count("<|vision_start|>") == 2
    elif name == "qwen2_5_vl":
        assert example["second_per_grid_ts"].tolist() == [1.0]     # 2 frames per pair at 2 frames per second
    else:
        untimed = vlm.encode(row, frames(), processor, fam, 4096)
        assert example.keys() == untimed.keys()
        assert all(torch.equal(example[key], untimed[key]) for key in example)


# ---------------------------------------------------------------- InstructBLIP-Video's own inputs

def test_instructblip_video_puts_each_video_in_place_and_gives_its_q_former_the_turn_never_an_answer(tmp_path):
    fam = vlm.family("instructblip_video")
    processor = AutoProcessor.from_pretrained(fam.build_tiny(TINY_VLM, ["a red circle moves left"] * 50, 32, tmp_path))
    row = row_with([("user", "<video>\nWhat moves?"), ("assistant", "a square"),
                    ("user", "And here? <video>"), ("assistant", "a blue circle moves up")], videos=2, frames=3)
    example = vlm.encode(row, frames(2, 3), processor, fam, 1024)
    prompt = processor.tokenizer.decode(example["input_ids"])
    run = "<video>" * (processor.num_query_tokens * 3)     # the queries of every frame, where the placeholder was
    assert prompt.startswith(f"<|user|>\n{run}\nWhat moves?<|end|>") and f"And here? {run}<|end|>" in prompt
    assert prompt.count("<video>") == 2 * len(run) // len("<video>")
    instructions = processor.qformer_tokenizer.batch_decode(example["qformer_input_ids"], skip_special_tokens=True)
    assert instructions == ["What moves?", "And here?"]
    assert example["pixel_values"].shape == (2, 3, 3, 32, 32)


def test_instructblip_video_loads_a_released_instructblip_checkpoint_as_transformers_documents(tmp_path):
    """The released InstructBLIP-Video weights are InstructBLIP's (model_type "instructblip", with a video token)."""
    fam = vlm.family("instructblip_video")
    base = fam.build_tiny(TINY_VLM, ["a red circle moves left"] * 50, 32, tmp_path / "video")
    video = InstructBlipVideoConfig.from_pretrained(base)
    towers = {key: {k: v for k, v in getattr(video, key).to_dict().items() if k != "model_type"}
              for key in ("vision_config", "qformer_config")}
    released = InstructBlipForConditionalGeneration(InstructBlipConfig(
        **towers, text_config=video.text_config.to_dict(), num_query_tokens=video.num_query_tokens,
        image_token_index=video.video_token_index, video_token_index=video.video_token_index))
    released.save_pretrained(tmp_path / "image")
    model = vlm.load_model(fam, str(tmp_path / "image"))
    for name, weight in released.state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name
    processor = AutoProcessor.from_pretrained(base)
    row = row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle")])
    batch = vlm.collate([vlm.encode(row, frames(), processor, fam, 4096)], processor.tokenizer.pad_token_id)
    assert torch.isfinite(model(**batch).loss)
