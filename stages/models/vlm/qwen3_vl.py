"""Qwen3-VL family: native video input like Qwen2-VL (`pixel_values_videos` + `video_grid_thw`), but the processor
writes each frame pair's time into the prompt ("<0.3 seconds>" before its vision tokens), computed from the video
metadata: the times `extract` recorded reach the prompt through it (stages.models.vlm.video_inputs).

The tiny model is Qwen3-VL's own vision tower (with its DeepStack features) and text model built from their config
classes, with a real processor (Qwen2-VL image processor and Qwen3-VL video processor, a byte-level BPE tokenizer
trained on our text, and the released ChatML layout).
"""
from pathlib import Path

from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from stages.models import vlm
from stages.models.tiny import save_tiny, train_tokenizer
from stages.models.vlm.qwen2_vl import CHAT_TEMPLATE as QWEN2_TEMPLATE
from stages.models.vlm.qwen2_vl import END_OF_TURN, IMAGE_PAD, MERGE, TEMPORAL, VIDEO_PAD, VISION_END, VISION_START

MODEL_CLASS = Qwen3VLForConditionalGeneration
VARLEN_VISION = True    # its vision tower attends by cu_seqlens, as Qwen2-VL's
# the model's vision tower, vision-to-text projector and language model (for the finetune switches)
VISION, PROJECTOR, LANGUAGE = "model.visual", "model.visual.merger", "model.language_model"
CANNOT_CACHE = ("its deepstack projectors (which train) take the outputs of intermediate tower blocks inside the "
                "tower's own forward, and the cache does not store those yet")

# A video part is the bare video token: transformers' processor replaces it with "<t seconds>" plus the frame pair's
# tokens inside their own vision start/end, per pair. Qwen2-VL's wrapper around it would nest those pairs in a second
# start/end, a layout the released Qwen3-VL never saw.
CHAT_TEMPLATE = QWEN2_TEMPLATE.replace("<|vision_start|><|video_pad|><|vision_end|>", VIDEO_PAD)

user_content, media_inputs = vlm.video_parts, vlm.video_inputs


def build_tiny(p: dict, texts, frame_size: int, out: Path) -> Path:
    """Save a random-init tiny Qwen3-VL and its processor to `out`; return `out`."""
    # the processor writes "<t seconds>" before every frame pair: the tokenizer learns those pieces
    times = [f"<{t / 10:.1f} seconds>" for t in range(0, 100)]
    tokenizer = train_tokenizer(list(texts) + times * 20, p["vocab_size"],
                                extra_special=["<|im_start|>", END_OF_TURN, VISION_START, VISION_END, VIDEO_PAD,
                                               IMAGE_PAD],
                                eos_token=END_OF_TURN, image_token=IMAGE_PAD, video_token=VIDEO_PAD,
                                vision_start_token=VISION_START, vision_end_token=VISION_END)
    size = {"shortest_edge": frame_size * frame_size, "longest_edge": frame_size * frame_size}
    patches = {"patch_size": p["patch_size"], "merge_size": MERGE, "temporal_patch_size": TEMPORAL}
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, **patches),
                                 video_processor=Qwen3VLVideoProcessor(size=size, cap_pixels_per_frame=True, **patches),
                                 tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    head_dim = p["text_hidden"] // p["heads"]
    spatial = head_dim * 3 // 16   # as Qwen2-VL: rotary pairs for height and width, the rest for time
    token = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=p["text_hidden"], head_dim=head_dim,
                         intermediate_size=2 * p["text_hidden"], num_hidden_layers=p["text_layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                          "mrope_section": [head_dim // 2 - 2 * spatial, spatial, spatial]},
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=p["vision_layers"], hidden_size=p["vision_hidden"],
                           intermediate_size=2 * p["vision_hidden"], num_heads=p["heads"],
                           out_hidden_size=p["text_hidden"], patch_size=p["patch_size"], spatial_merge_size=MERGE,
                           temporal_patch_size=TEMPORAL, num_position_embeddings=(frame_size // p["patch_size"]) ** 2,
                           deepstack_visual_indexes=[0]),
        image_token_id=token(IMAGE_PAD), video_token_id=token(VIDEO_PAD),
        vision_start_token_id=token(VISION_START), vision_end_token_id=token(VISION_END))
    return save_tiny(MODEL_CLASS(config), processor, out)
