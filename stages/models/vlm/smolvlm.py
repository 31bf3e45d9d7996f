"""SmolVLM2 family (Idefics3 lineage): each video goes through the processor's video path, which writes a timestamped
line per frame ("Frame from 00:01:") followed by that frame's image tokens; the times are those `extract` recorded,
passed as video metadata (stages.models.vlm.video_inputs).

The tiny model is SmolVLM's own SigLIP-style vision tower, pixel-shuffle connector and Llama text model built from
their config classes, with a real processor (SmolVLM image and video processors, a byte-level BPE tokenizer trained on
our text) and the released chat template ("User: ...<end_of_utterance>\\nAssistant: ...").
"""
from pathlib import Path

from transformers import (
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.models.smolvlm.processing_smolvlm import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_MEDIA_OUTTRO,
    DEFAULT_VIDEO_INTRO,
    FRAME_TIMESTAMP_MESSAGE,
)

from stages.models import vlm
from stages.models.tiny import save_tiny, train_tokenizer

IMAGE, VIDEO, END_OF_TURN = "<image>", "<video>", "<end_of_utterance>"
FAKE_IMAGE, GLOBAL_IMAGE = "<fake_token_around_image>", "<global-img>"
MODEL_CLASS = SmolVLMForConditionalGeneration
# the model's vision tower, vision-to-text projector and language model (for the finetune switches)
VISION, PROJECTOR, LANGUAGE = "model.vision_model", "model.connector", "model.text_model"
SCALE = 2                  # pixel shuffle: SCALE x SCALE patches become one token

user_content, media_inputs = vlm.video_parts, vlm.video_inputs


def build_tiny(p: dict, texts, frame_size: int, out: Path) -> Path:
    """Save a random-init tiny SmolVLM and its processor to `out`; return `out`."""
    # The processor writes the same sentences around every video: the tokenizer learns them as a few tokens each.
    boilerplate = [DEFAULT_VIDEO_INTRO.format(frame_count=n, video_duration="0:00:02") + FRAME_TIMESTAMP_MESSAGE
                   .format(timestamp="00:01") + DEFAULT_MEDIA_OUTTRO + "User: Assistant:" for n in ("one", "four")]
    tokenizer = train_tokenizer(list(texts) + boilerplate * 200, p["vocab_size"],
                                extra_special=["<|im_start|>", END_OF_TURN, FAKE_IMAGE, GLOBAL_IMAGE, IMAGE, VIDEO],
                                eos_token=END_OF_TURN, image_token=IMAGE, video_token=VIDEO,
                                fake_image_token=FAKE_IMAGE, global_image_token=GLOBAL_IMAGE,
                                end_of_utterance_token=END_OF_TURN)
    # frames are resized to a side the pixel shuffle can fold: a multiple of patch_size x SCALE
    unit = p["patch_size"] * SCALE
    side = -(-frame_size // unit) * unit
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size={"longest_edge": side}, max_image_size={"longest_edge": side},
                                              do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size={"longest_edge": side}, max_image_size={"longest_edge": side}),
        tokenizer=tokenizer, image_seq_len=(side // p["patch_size"]) ** 2 // SCALE ** 2,
        chat_template=DEFAULT_CHAT_TEMPLATE)
    config = SmolVLMConfig(
        vision_config=dict(hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
                           num_hidden_layers=p["vision_layers"], num_attention_heads=p["heads"],
                           image_size=side, patch_size=p["patch_size"]),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=p["text_hidden"],
                         intermediate_size=2 * p["text_hidden"], num_hidden_layers=p["text_layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                         max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        scale_factor=SCALE, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        pad_token_id=tokenizer.pad_token_id)
    return save_tiny(MODEL_CLASS(config), processor, out)
