"""LLaVA family: a video's frames go in as interleaved images, one `<image>` per frame.

The tiny model is CLIP vision + Llama text built from their config classes, with a real processor: CLIP image
processor, a byte-level BPE tokenizer trained on our text, and a chat template.
"""
from pathlib import Path

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from stages.models.tiny import save_tiny, train_tokenizer

IMAGE = "<image>"
END_OF_TURN = "<|end|>"
# Roles as special tokens; content is either a string or a list of {"type": "image"|"text"} parts (the HF convention).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MODEL_CLASS = LlavaForConditionalGeneration
# the model's vision tower, vision-to-text projector and language model (for the finetune switches)
VISION, PROJECTOR, LANGUAGE = "model.vision_tower", "model.multi_modal_projector", "model.language_model"


def user_content(text_parts: list[str], frames_per_video: list[int]) -> list[dict]:
    """Content parts of a user turn: text_parts[i] precedes video i; each video becomes its frames as images."""
    content = []
    for text, count in zip(text_parts, frames_per_video + [0]):
        if text:
            content.append({"type": "text", "text": text})
        content.extend({"type": "image"} for _ in range(count))
    return content


def media_inputs(frames_per_video: list, times: list[list[float]]) -> dict:
    """Processor keyword arguments for a sample's videos (each a uint8 [n, h, w, 3] array): all frames as images
    (LLaVA has no notion of time, so `times` goes unused)."""
    return {"images": [frame for video in frames_per_video for frame in video]} if frames_per_video else {}


def build_tiny(p: dict, texts, frame_size: int, out: Path) -> Path:
    """Save a random-init tiny LLaVA and its processor to `out`; return `out`."""
    tokenizer = train_tokenizer(texts, p["vocab_size"], extra_special=[IMAGE, "<|system|>", "<|user|>",
                                                                       "<|assistant|>", END_OF_TURN],
                                eos_token=END_OF_TURN, image_token=IMAGE)
    image_processor = CLIPImageProcessor(size={"shortest_edge": frame_size},
                                         crop_size={"height": frame_size, "width": frame_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=p["patch_size"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
                              num_hidden_layers=p["vision_layers"], num_attention_heads=p["heads"],
                              image_size=frame_size, patch_size=p["patch_size"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p["text_hidden"], intermediate_size=2 * p["text_hidden"],
                       num_hidden_layers=p["text_layers"], num_attention_heads=p["heads"],
                       num_key_value_heads=p["heads"], max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    return save_tiny(LlavaForConditionalGeneration(config), processor, out)
