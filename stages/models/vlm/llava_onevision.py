"""LLaVA-OneVision family: each video goes through the processor's video path, `<video>` expanded to every frame's
vision tokens pooled 2 x 2 plus one newline token; the frames are `pixel_values_videos` [videos, frames, 3, h, w].
The model has no notion of time: the recorded frame times are not passed on.

The tiny model is LLaVA-OneVision's SigLIP vision tower, projector and Qwen2 text model built from their config
classes, with a real processor (LLaVA-OneVision image and video processors, a byte-level BPE tokenizer trained on our
text) and the released ChatML layout.
"""
from pathlib import Path

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from stages.models import vlm
from stages.models.tiny import save_tiny, train_tokenizer

IMAGE, VIDEO, END_OF_TURN = "<image>", "<video>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>{% elif part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MODEL_CLASS = LlavaOnevisionForConditionalGeneration
# the model's vision tower, vision-to-text projector and language model (for the finetune switches)
VISION, PROJECTOR, LANGUAGE = "model.vision_tower", "model.multi_modal_projector", "model.language_model"


def user_content(text_parts: list[str], frames_per_video: list[int]) -> list[dict]:
    return vlm.video_parts(text_parts, frames_per_video)


def media_inputs(frames_per_video: list, times: list[list[float]]) -> dict:
    """The videos as they are; the processor takes no frame times (`times` goes unused)."""
    return {"videos": list(frames_per_video), "do_sample_frames": False} if frames_per_video else {}


def build_tiny(p: dict, texts, frame_size: int, out: Path) -> Path:
    """Save a random-init tiny LLaVA-OneVision and its processor to `out`; return `out`."""
    tokenizer = train_tokenizer(texts, p["vocab_size"], extra_special=["<|im_start|>", END_OF_TURN, IMAGE, VIDEO],
                                eos_token=END_OF_TURN, image_token=IMAGE, video_token=VIDEO)
    square = {"height": frame_size, "width": frame_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=[[frame_size, frame_size]]),
        video_processor=LlavaOnevisionVideoProcessor(size=square), tokenizer=tokenizer,
        num_image_tokens=(frame_size // p["patch_size"]) ** 2, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE)
    token = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=p["vision_hidden"],
                           intermediate_size=2 * p["vision_hidden"], num_hidden_layers=p["vision_layers"],
                           num_attention_heads=p["heads"], image_size=frame_size, patch_size=p["patch_size"]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=p["text_hidden"],
                         intermediate_size=2 * p["text_hidden"], num_hidden_layers=p["text_layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["heads"], max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        image_token_index=token(IMAGE), video_token_index=token(VIDEO), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[frame_size, frame_size]])
    return save_tiny(MODEL_CLASS(config), processor, out)
