"""InternVL family (InternVL 2.5 to 3.5 in transformers' layout): each video goes through the processor's video path,
`<video>` expanded to one "FrameN: <img>...</img>" line per frame, every frame's patches pixel-shuffled to a quarter
as many tokens; all frames of a batch are one `pixel_values` [frames, 3, h, w]. The released model numbers its
frames and has no notion of time: the recorded frame times are not passed on.

The tiny model is InternVL's own vision tower (InternViT), pixel-shuffle projector and Qwen2 text model built from
their config classes, with a real processor (GOT-OCR2 image processor and InternVL video processor, a byte-level BPE
tokenizer trained on our text) and the released ChatML layout.
"""
from pathlib import Path

from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
)

from stages.models import vlm
from stages.models.tiny import save_tiny, train_tokenizer
from stages.models.vlm.llava_onevision import CHAT_TEMPLATE, END_OF_TURN

START_IMAGE, END_IMAGE, CONTEXT, VIDEO, IMAGE = "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<image>"
MODEL_CLASS = InternVLForConditionalGeneration
# the model's vision tower, vision-to-text projector and language model (for the finetune switches)
VISION, PROJECTOR, LANGUAGE = "model.vision_tower", "model.multi_modal_projector", "model.language_model"
DOWNSAMPLE = 0.5           # pixel shuffle: 2 x 2 patches become one token


def user_content(text_parts: list[str], frames_per_video: list[int]) -> list[dict]:
    return vlm.video_parts(text_parts, frames_per_video)


def media_inputs(frames_per_video: list, times: list[list[float]]) -> dict:
    """The videos as they are; the processor takes no frame times (`times` goes unused)."""
    return {"videos": list(frames_per_video), "do_sample_frames": False} if frames_per_video else {}


def build_tiny(p: dict, texts, frame_size: int, out: Path) -> Path:
    """Save a random-init tiny InternVL and its processor to `out`; return `out`."""
    frame_lines = [f"Frame{n}: " for n in range(1, 33)]   # the processor's per-frame prefix, learnt as few tokens
    tokenizer = train_tokenizer(list(texts) + frame_lines * 20, p["vocab_size"],
                                extra_special=["<|im_start|>", END_OF_TURN, START_IMAGE, END_IMAGE, CONTEXT, VIDEO,
                                               IMAGE],
                                eos_token=END_OF_TURN, start_image_token=START_IMAGE, end_image_token=END_IMAGE,
                                context_image_token=CONTEXT, video_token=VIDEO)
    # frames are resized to a side the pixel shuffle can fold: a multiple of 2 patches
    unit = 2 * p["patch_size"]
    side = -(-frame_size // unit) * unit
    square = {"height": side, "width": side}
    tokens_per_frame = int((side // p["patch_size"]) ** 2 * DOWNSAMPLE ** 2)
    processor = InternVLProcessor(image_processor=GotOcr2ImageProcessor(size=square, crop_to_patches=False),
                                  video_processor=InternVLVideoProcessor(size=square), tokenizer=tokenizer,
                                  image_seq_length=tokens_per_frame, chat_template=CHAT_TEMPLATE)
    config = InternVLConfig(
        vision_config=dict(hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
                           num_hidden_layers=p["vision_layers"], num_attention_heads=p["heads"],
                           image_size=[side, side], patch_size=[p["patch_size"], p["patch_size"]]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=p["text_hidden"],
                         intermediate_size=2 * p["text_hidden"], num_hidden_layers=p["text_layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["heads"], max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT), image_seq_length=tokens_per_frame,
        downsample_ratio=DOWNSAMPLE, vision_feature_layer=-1, tie_word_embeddings=False)
    return save_tiny(MODEL_CLASS(config), processor, out)
