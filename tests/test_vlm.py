import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from stages import vlm
from stages.files import read_jsonl

PARAMS = {"vision_hidden": 32, "vision_layers": 1, "patch_size": 8, "text_hidden": 32, "text_layers": 1, "heads": 2,
          "vocab_size": 300}
FAM = vlm.family("llava")


@pytest.fixture(scope="module")
def tiny_llava(small_data, tmp_path_factory):
    rows = read_jsonl(small_data / "data/manifest/train.jsonl")
    texts = [m["content"].replace(vlm.VIDEO, "") for row in rows for m in row["messages"]]
    path = FAM.build_tiny(PARAMS, texts, 32, tmp_path_factory.mktemp("llava") / "base")
    return AutoProcessor.from_pretrained(path), LlavaForConditionalGeneration.from_pretrained(path)


def row_with(turns, videos=1, frames=4):
    messages = [{"role": role, "content": text} for role, text in turns]
    return {"id": "t", "videos": [{"num_frames": frames, "frames": "x"}] * videos, "messages": messages}


def frames(videos=1, count=4):
    return [np.random.default_rng(i).integers(0, 255, (count, 32, 32, 3), dtype=np.uint8) for i in range(videos)]


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


def test_mixed_batches_pad_tokens_and_stack_frames(tiny_llava):
    processor, model = tiny_llava
    one = vlm.encode(row_with([("user", "<video>\nDescribe."), ("assistant", "a red circle")]), frames(),
                     processor, FAM, 512)
    two = vlm.encode(row_with([("user", "<video> then <video>: which moves?"), ("assistant", "the second one")],
                              videos=2, frames=2), frames(2, 2), processor, FAM, 512)
    batch = vlm.collate([one, two], processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 4 + 2 * 2
    assert batch["attention_mask"].sum() == len(one["input_ids"]) + len(two["input_ids"])
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_generation_prompts_end_at_the_assistant_turn(tiny_llava, small_data):
    processor, model = tiny_llava
    rows = read_jsonl(small_data / "data/manifest/test.jsonl")[:3]
    inputs = vlm.generation_inputs(rows, processor, FAM, small_data / "data/frames")
    assert (inputs["attention_mask"][:, -1] == 1).all()      # left padding: every prompt ends the batch
    text = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    assert text.endswith("<|assistant|>\n") and rows[0]["target"] not in text
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[0] == 3
