"""Qwen2-VL family: each video goes in natively, as `pixel_values_videos` + `video_grid_thw` (frames in pairs through
a 3D patch embedding), with its sampling fps passed along as video metadata.

The tiny model is Qwen2-VL's own vision tower and text model built from their config classes, with a real processor
(Qwen2-VL image and video processors, a byte-level BPE tokenizer trained on our text) and a ChatML template like the
released one.
"""
from pathlib import Path

from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from stages.models import vlm
from stages.models.tiny import save_tiny, train_tokenizer

VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
END_OF_TURN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MODEL_CLASS = Qwen2VLForConditionalGeneration
# the model's vision tower, vision-to-text projector and language model (for the finetune switches)
VISION, PROJECTOR, LANGUAGE = "model.visual", "model.visual.merger", "model.language_model"
MERGE, TEMPORAL = 2, 2     # 2x2 patches merge into one token; frames go in pairs
# the vision tower attends within each frame pair by cu_seqlens: run it on stages.models.attention.varlen_sdpa
VARLEN_VISION = True


user_content, media_inputs = vlm.video_parts, vlm.video_inputs


def build_tiny(p: dict, texts, frame_size: int, out: Path, model_class=MODEL_CLASS, config_class=Qwen2VLConfig,
               processor_class=Qwen2VLProcessor, vision: dict | None = None) -> Path:
    """Save a random-init tiny model of this family (or of Qwen2.5-VL, which passes its classes) and its processor
    to `out`; return `out`."""
    tokenizer = train_tokenizer(texts, p["vocab_size"], extra_special=["<|im_start|>", END_OF_TURN, VISION_START,
                                                                       VISION_END, VIDEO_PAD, IMAGE_PAD],
                                eos_token=END_OF_TURN, image_token=IMAGE_PAD, video_token=VIDEO_PAD)
    # every frame is resized to frame_size x frame_size: both pixel bounds at that area
    size = {"shortest_edge": frame_size * frame_size, "longest_edge": frame_size * frame_size}
    patches = {"patch_size": p["patch_size"], "merge_size": MERGE, "temporal_patch_size": TEMPORAL}
    processor = processor_class(image_processor=Qwen2VLImageProcessor(size=size, **patches),
                                video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=True, **patches),
                                tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    head_dim = p["text_hidden"] // p["heads"]
    spatial = head_dim * 3 // 16   # rotary pairs for height and for width; the rest for time: [16, 24, 24] at 128
    section = [head_dim // 2 - 2 * spatial, spatial, spatial]
    token = tokenizer.convert_tokens_to_ids
    config = config_class(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=p["text_hidden"],
                         intermediate_size=2 * p["text_hidden"], num_hidden_layers=p["text_layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=vision or vision_config(p),
        image_token_id=token(IMAGE_PAD), video_token_id=token(VIDEO_PAD),
        vision_start_token_id=token(VISION_START), vision_end_token_id=token(VISION_END))
    return save_tiny(model_class(config), processor, out)


def vision_config(p: dict) -> dict:
    return dict(depth=p["vision_layers"], embed_dim=p["vision_hidden"], hidden_size=p["text_hidden"],
                num_heads=p["heads"], patch_size=p["patch_size"], spatial_merge_size=MERGE,
                temporal_patch_size=TEMPORAL)
