"""LLaVA-NeXT-Video family: each video goes through the processor's video path, `<video>` expanded to every frame's
CLIP patch tokens pooled 2 x 2 (average); the frames are `pixel_values_videos` [videos, frames, 3, h, w]. The model
has no notion of time: the recorded frame times are not passed on.

The tiny model is CLIP vision + projector + Llama text built from their config classes, with a real processor
(LLaVA-NeXT-Video video processor, LLaVA-NeXT image processor, a byte-level BPE tokenizer trained on our text) and
a chat template with the roles as special tokens (the released Vicuna-style "USER: ... ASSISTANT:" layout would
make the answer's first token depend on the space after "ASSISTANT:").
"""
from pathlib import Path

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextImageProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
)

from stages.models import vlm
from stages.models.tiny import save_tiny, train_tokenizer
from stages.models.vlm.llava import END_OF_TURN

IMAGE, VIDEO = "<image>", "<video>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>{% elif part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MODEL_CLASS = LlavaNextVideoForConditionalGeneration
# the model's vision tower, vision-to-text projector and language model (for the finetune switches)
VISION, PROJECTOR, LANGUAGE = "model.vision_tower", "model.multi_modal_projector", "model.language_model"


def user_content(text_parts: list[str], frames_per_video: list[int]) -> list[dict]:
    return vlm.video_parts(text_parts, frames_per_video)


def media_inputs(frames_per_video: list, times: list[list[float]]) -> dict:
    """The videos as they are; the processor takes no frame times (`times` goes unused)."""
    return {"videos": list(frames_per_video), "do_sample_frames": False} if frames_per_video else {}


def build_tiny(p: dict, texts, frame_size: int, out: Path) -> Path:
    """Save a random-init tiny LLaVA-NeXT-Video and its processor to `out`; return `out`."""
    tokenizer = train_tokenizer(texts, p["vocab_size"], extra_special=[IMAGE, VIDEO, "<|system|>", "<|user|>",
                                                                       "<|assistant|>", END_OF_TURN],
                                eos_token=END_OF_TURN, image_token=IMAGE, video_token=VIDEO)
    # frames are resized to a side whose patch grid the 2 x 2 pooling halves exactly: the processor counts
    # grid² // 4 tokens, while the model's pooling of an odd grid rounds up
    unit = 2 * p["patch_size"]
    side = -(-frame_size // unit) * unit
    square = {"height": side, "width": side}
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": side}, crop_size=square),
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size=square,
                                                image_grid_pinpoints=[[side, side]]),
        tokenizer=tokenizer, patch_size=p["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
                              num_hidden_layers=p["vision_layers"], num_attention_heads=p["heads"],
                              image_size=side, patch_size=p["patch_size"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p["text_hidden"], intermediate_size=2 * p["text_hidden"],
                       num_hidden_layers=p["text_layers"], num_attention_heads=p["heads"],
                       num_key_value_heads=p["heads"], max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    token = tokenizer.convert_tokens_to_ids
    config = LlavaNextVideoConfig(vision_config=vision, text_config=text, image_token_index=token(IMAGE),
                                  video_token_index=token(VIDEO), vision_feature_select_strategy="default",
                                  vision_feature_layer=-1, image_grid_pinpoints=[[side, side]],
                                  spatial_pool_stride=2, spatial_pool_mode="average")
    return save_tiny(MODEL_CLASS(config), processor, out)
