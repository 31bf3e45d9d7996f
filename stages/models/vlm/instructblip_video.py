"""InstructBLIP-Video family: every frame of a video goes through the vision tower, then through the Q-Former, whose
learned queries read it together with the instruction; each frame becomes `num_query_tokens` tokens, which fill
that video's run of `<video>` tokens in the prompt. The model has no notion of time: the recorded frame times are
not passed on.

Its processor cannot lay out a chat (InstructBlipVideoProcessor puts exactly one video of 4 frames before the whole
text, and hands that whole text, answers included, to the Q-Former), so this family builds the inputs itself
(`model_inputs`) from the processor's own parts:
- the prompt: the rendered chat, each `<video>` placeholder expanded to queries x frames video tokens in its place;
- the Q-Former's instruction for each video: the text of the user turn that holds it, never an answer;
- the frames: the processor's video processor, [videos, frames, 3, h, w], one frame count per batch.
The model takes them as they are: it flattens every video's frames into one batch for the Q-Former and scatters the
query tokens into the `<video>` positions in order, so any number of videos per sample and any frame count work.

The tiny model is InstructBLIP-Video's own vision tower, Q-Former and a Llama text model (the released ones use
Vicuna) built from their config classes, with a real processor (InstructBLIP-Video video processor, byte-level BPE
tokenizers trained on our text for the language model and for the Q-Former) and a chat template with the roles as
special tokens.
"""
from pathlib import Path

from transformers import (
    BatchFeature,
    InstructBlipVideoConfig,
    InstructBlipVideoForConditionalGeneration,
    InstructBlipVideoProcessor,
    InstructBlipVideoVideoProcessor,
    LlamaConfig,
)

from stages.models import vlm
from stages.models.tiny import save_tiny, train_tokenizer
from stages.models.vlm.llava import END_OF_TURN
from stages.models.vlm.llava_next_video import CHAT_TEMPLATE

VIDEO = "<video>"
MODEL_CLASS = InstructBlipVideoForConditionalGeneration
# The vision tower, the Q-Former (the bridge that trains; its learned queries and the linear projection into the
# language model follow the full/frozen switches of the whole model, and stay as they are under LoRA) and the language
# model, for the finetune switches
VISION, PROJECTOR, LANGUAGE = "vision_model", "qformer", "language_model"
# why train_vlm.packing refuses this family (vlm.check_packing)
CANNOT_PACK = ("its forward hands position_ids to the Q-Former as well as to the language model, so the positions "
               "that mark packed samples cannot be given to the language model alone")
QUERY_TOKENS = 8           # the tiny model's tokens per frame (the released models: 32)


def user_content(text_parts: list[str], frames_per_video: list[int]) -> list[dict]:
    return vlm.video_parts(text_parts, frames_per_video)


def media_inputs(frames_per_video: list, times: list[list[float]]) -> dict:
    """The videos as they are; the model takes no frame times (`times` goes unused)."""
    return {"videos": list(frames_per_video)} if frames_per_video else {}


def model_inputs(processor, conversations: list[list[dict]], videos: list, times: list[list[float]],
                 generation_prompt: bool = False, **kwargs) -> BatchFeature:
    """The model's inputs for `conversations` (HF content-part messages), whose videos are `videos` in order:
    input_ids with each `<video>` expanded in place, one Q-Former instruction per video, and the frames."""
    if not videos:
        raise ValueError("instructblip_video needs a video in every batch: its model has no text-only path")
    texts, instructions, used = [], [], 0
    for messages in conversations:
        parts = vlm.render(processor, messages, generation_prompt).split(VIDEO)
        expanded = [parts[0]]
        for part in parts[1:]:
            expanded += [VIDEO * (processor.num_query_tokens * len(videos[used])), part]
            used += 1
        texts.append("".join(expanded))
        instructions += [" ".join(part["text"].strip() for part in message["content"] if part["type"] == "text")
                         for message in messages if message["role"] == "user"
                         for part in message["content"] if part["type"] == "video"]
    padding = {key: kwargs[key] for key in ("padding", "padding_side") if key in kwargs}
    text = processor.tokenizer(texts, return_tensors="pt", **padding)
    qformer = processor.qformer_tokenizer(instructions, return_tensors="pt", padding=True)
    frames = processor.video_processor(videos=videos, return_tensors="pt")["pixel_values"]
    return BatchFeature({**text, "qformer_input_ids": qformer["input_ids"],
                         "qformer_attention_mask": qformer["attention_mask"], "pixel_values": frames})


def build_tiny(p: dict, texts, frame_size: int, out: Path) -> Path:
    """Save a random-init tiny InstructBLIP-Video and its processor to `out`; return `out`."""
    tokenizer = train_tokenizer(texts, p["vocab_size"], extra_special=[VIDEO, "<|system|>", "<|user|>",
                                                                       "<|assistant|>", END_OF_TURN],
                                eos_token=END_OF_TURN, video_token=VIDEO)
    tokenizer.chat_template = CHAT_TEMPLATE   # the processor drops its own on loading (vlm.render)
    qformer_tokenizer = train_tokenizer(texts, p["vocab_size"])
    # frames are resized to a whole number of patches: the vision tower's position embeddings are fixed
    side = -(-frame_size // p["patch_size"]) * p["patch_size"]
    processor = InstructBlipVideoProcessor(
        video_processor=InstructBlipVideoVideoProcessor(size={"height": side, "width": side}), tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer, num_query_tokens=QUERY_TOKENS)
    vision = dict(hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
                  num_hidden_layers=p["vision_layers"], num_attention_heads=p["heads"], image_size=side,
                  patch_size=p["patch_size"], initializer_range=0.02)
    qformer = dict(vocab_size=len(qformer_tokenizer), hidden_size=p["vision_hidden"],
                   intermediate_size=2 * p["vision_hidden"], num_hidden_layers=p["vision_layers"],
                   num_attention_heads=p["heads"], cross_attention_frequency=1, max_position_embeddings=512,
                   pad_token_id=qformer_tokenizer.pad_token_id)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p["text_hidden"], intermediate_size=2 * p["text_hidden"],
                       num_hidden_layers=p["text_layers"], num_attention_heads=p["heads"],
                       num_key_value_heads=p["heads"], max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = InstructBlipVideoConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                                     num_query_tokens=QUERY_TOKENS,
                                     video_token_index=tokenizer.convert_tokens_to_ids(VIDEO))
    return save_tiny(MODEL_CLASS(config), processor, out)
