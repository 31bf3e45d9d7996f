"""What every vision-language family shares: manifest rows -> chat messages -> model inputs with assistant-only
labels, and batching. What differs per family (how frames become inputs, the tiny config) lives in one module each,
which provides what `Family` names; `FAMILIES` (at the bottom) registers them, and `family()` is the one place where
`train_vlm.family` takes effect. A new family is one module plus one line in `FAMILIES` (and its name in the params
schema's enum, which a test keeps equal to the registry).
"""
import functools
import inspect
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from stages.data.formats import VIDEO  # the placeholder of one video in a user turn
from stages.data.frames import FRAMES, load_frames
from stages.models import attention
from stages.results.answers import greedy_answers

IGNORE = -100          # label of every position the loss must not see


@runtime_checkable
class Family(Protocol):
    """What a family module provides (a module satisfies this structurally: its constants and functions)."""

    MODEL_CLASS: type      # the transformers ...ForConditionalGeneration class; its config's model_type is the family's
    VISION: str            # module names of the vision tower, the vision-to-text projector and the language model,
    PROJECTOR: str         # for the finetune switches and LoRA targets
    LANGUAGE: str

    def user_content(self, text_parts: list[str], frames_per_video: list[int]) -> list[dict]:
        """Chat content parts of a user turn: text_parts[i] precedes video i, which has frames_per_video[i] frames."""

    def media_inputs(self, frames_per_video: list, times: list[list[float]]) -> dict:
        """Processor keyword arguments for a sample's videos (uint8 [n, h, w, 3] each; frame i of video v was taken
        at times[v][i] seconds, as `extract` recorded)."""

    def build_tiny(self, p: dict, texts, frame_size: int, out: Path) -> Path:
        """Save a random-init tiny model and its processor (tokenizer trained on `texts`) to `out`; return `out`."""


@runtime_checkable
class LaysOutItsInputs(Protocol):
    """A family whose processor cannot lay out a chat with videos in place builds the model's inputs itself."""

    def model_inputs(self, processor, conversations: list[list[dict]], videos: list, times: list[list[float]],
                     generation_prompt: bool = False, **kwargs):
        """What `model_inputs` below returns, for this family."""


def family(name: str) -> Family:
    """The module of family `name`: the one place where `train_vlm.family` (or a training record's) takes effect."""
    if name not in FAMILIES:
        raise ValueError(f"unknown VLM family {name!r}; valid families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# Checkpoints of another model_type that a family's class loads as its own: transformers documents InstructBLIP-Video
# as using InstructBLIP's checkpoints (Salesforce/instructblip-vicuna-7b is model_type "instructblip").
SHARED_CHECKPOINTS = {"instructblipvideo": {"instructblip"}}


def load_model(fam: Family, path: str, **kwargs):
    """`fam.MODEL_CLASS.from_pretrained(path)`, after checking that the checkpoint is of this family: transformers
    would otherwise only warn and build the family's class from a foreign config. A family with `VARLEN_VISION`
    runs its vision tower on stages.models.attention's varlen SDPA (the same arithmetic, batched)."""
    expected = fam.MODEL_CLASS.config_class.model_type
    found = checkpoint_model_type(path)
    if found is not None and found != expected and found not in SHARED_CHECKPOINTS.get(expected, ()):
        name = next(key for key, module in FAMILIES.items() if module is fam)
        raise ValueError(f"checkpoint {path} has model_type {found!r}, but train_vlm.family {name!r} expects "
                         f"{expected!r}; pick the family of that checkpoint")
    model = fam.MODEL_CLASS.from_pretrained(path, **kwargs)
    if getattr(fam, "VARLEN_VISION", False):   # one batched attention call per frame size, not one per frame pair
        attention.use_for_vision(model)
    return model


def checkpoint_model_type(path: str) -> str | None:
    """The model_type in a checkpoint's config.json (a LoRA adapter folder names its base's); None when unknown."""
    from transformers import AutoConfig

    folder = Path(path)
    if (folder / "adapter_config.json").exists():
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        return checkpoint_model_type(base)
    try:
        return AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError):   # unreadable here: from_pretrained then fails with transformers' own reason
        return None


def build_tiny_base(fam: Family, p: dict, train_rows: list[dict], out: Path) -> Path:
    """The family's tiny model (train_vlm.model: tiny), its tokenizer trained on the training rows' text, for frames
    of the size `extract` wrote. train_vlm builds it; `embed` builds the same one (same seed) to cache its tower."""
    texts = [message["content"].replace(VIDEO, "") for row in train_rows for message in row["messages"]]
    return fam.build_tiny(p["tiny"], texts, load_frames(train_rows[0])[0].shape[1], out)


def frame_times(row: dict, videos: list[np.ndarray]) -> list[list[float]]:
    """The time in seconds of each frame of each of the row's videos, as `extract` recorded them; one frame per
    second for a row that records none."""
    return [list(video.get("timestamps") or range(len(frames))) for video, frames in zip(row["videos"], videos)]


def video_parts(text_parts: list[str], frames_per_video: list[int]) -> list[dict]:
    """Content parts of a user turn for families with native video input: text_parts[i] precedes video i, and each
    video is one video part."""
    content = []
    for index, text in enumerate(text_parts):
        if text:
            content.append({"type": "text", "text": text})
        if index < len(frames_per_video):
            content.append({"type": "video"})
    return content


def video_inputs(frames_per_video: list, times: list[list[float]]) -> dict:
    """Processor keyword arguments for families with native video input: the videos as they are (uint8
    [n, h, w, 3]), already sampled by `extract`, with metadata from which transformers computes the frame times the
    prompt shows (SmolVLM, Qwen3-VL) or the time positions (Qwen2.5-VL): those times are `frames_indices` / `fps`,
    so the indices are the recorded times in units of the sampling rate (whole numbers for evenly sampled frames
    that start at 0, and exactly the recorded times otherwise, where plain indices would shift them to 0)."""
    if not frames_per_video:
        return {}
    metadata = []
    for video, seconds in zip(frames_per_video, times):
        fps = sampling_fps(seconds)
        metadata.append({"fps": fps, "total_num_frames": len(video), "frames_indices": [t * fps for t in seconds]})
    return {"videos": list(frames_per_video), "video_metadata": metadata, "do_sample_frames": False}


def sampling_fps(seconds: list[float]) -> float:
    """Frames per second of frames taken at `seconds` (1 for a single frame)."""
    span = seconds[-1] - seconds[0] if len(seconds) > 1 else 0
    return (len(seconds) - 1) / span if span > 0 else 1.0


def to_messages(row: dict, fam, include_answers: bool = True) -> tuple[list[dict], list[int]]:
    """Chat messages in the HF content-part format, and how many of the row's videos each message holds."""
    counts = [video["num_frames"] for video in row["videos"]]
    messages, videos_per_message, used = [], [], 0
    for message in row["messages"]:
        if message["role"] == "assistant" and not include_answers:
            break
        texts = message["content"].split(VIDEO)
        n = len(texts) - 1
        if message["role"] == "user":
            content = fam.user_content(texts, counts[used:used + n])
        else:
            content = [{"type": "text", "text": message["content"]}]
        messages.append({"role": message["role"], "content": content})
        videos_per_message.append(n)
        used += n
    return messages, videos_per_message


def render(processor, messages, generation_prompt=False) -> str:
    """The chat as text, by the processor's chat template, or its tokenizer's where the processor has none
    (InstructBlipVideoProcessor drops a chat template when it is loaded; the tokenizer keeps the same file)."""
    owner = processor if processor.chat_template is not None else processor.tokenizer
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def model_inputs(fam, processor, conversations: list[list[dict]], videos: list, times: list[list[float]],
                 generation_prompt: bool = False, **kwargs):
    """The model's inputs (a BatchFeature) for `conversations` (content-part messages, one list per sample), whose
    videos are `videos` in order, frame times `times`: the one place where a processor is called. kwargs go to the
    processor (return_tensors, padding, padding_side)."""
    if isinstance(fam, LaysOutItsInputs):
        return fam.model_inputs(processor, conversations, videos, times, generation_prompt, **kwargs)
    texts = [render(processor, messages, generation_prompt) for messages in conversations]
    return processor(text=texts, **fam.media_inputs(videos, times), **kwargs)


def encode(row: dict, videos: list[np.ndarray], processor, fam, max_length: int) -> dict:
    """Model inputs for one sample, with labels on the assistant turns only (each with its end-of-turn token).

    A turn's span is located by rendering the conversation up to it. When no media follows that point, the tokens
    after it are plain text in both the expanded and the unexpanded sequence, so they are counted from the end with
    the tokenizer alone; otherwise the prefix goes through the processor, whatever media expansion the family does.
    Either way the located tokens are checked, never assumed.
    """
    messages, per_message = to_messages(row, fam)
    text = render(processor, messages)
    times = frame_times(row, videos)
    inputs = dict(model_inputs(fam, processor, [messages], videos, times, return_tensors="pt"))
    ids = inputs["input_ids"][0]
    if len(ids) > max_length:
        raise ValueError(f"sample {row['id']}: {len(ids)} tokens, above train_vlm.max_length={max_length}")
    text_ids = processor.tokenizer(text)["input_ids"]

    def position(upto: int, generation_prompt: bool) -> int:
        """Index in `ids` where the rendering of messages[:upto] ends."""
        prefix = render(processor, messages[:upto], generation_prompt)
        seen = sum(per_message[:upto])
        if seen == len(videos):
            tail = text_ids[len(processor.tokenizer(prefix)["input_ids"]):]
            if ids[len(ids) - len(tail):].tolist() == tail:
                return len(ids) - len(tail)
        else:
            prefix_ids = model_inputs(fam, processor, [messages[:upto]], videos[:seen], times[:seen],
                                      generation_prompt, return_tensors="pt")["input_ids"][0]
            if torch.equal(ids[:len(prefix_ids)], prefix_ids):
                return len(prefix_ids)
        raise ValueError(f"sample {row['id']}: the conversation up to turn {upto} does not tokenize as a prefix")

    labels = torch.full_like(ids, IGNORE)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = position(turn, generation_prompt=True)
        end = len(ids) if turn == len(messages) - 1 else position(turn + 1, generation_prompt=False)
        while end > start and not processor.tokenizer.decode(ids[end - 1:end]).strip():
            end -= 1   # the template's trailing newline is not part of the answer
        labels[start:end] = ids[start:end]
    inputs = {key: value[0] if key in SEQUENCE_KEYS else value for key, value in inputs.items()}
    return {**inputs, "labels": labels}


def over_budget(rows: list[dict], processor, fam, max_length: int, frames_dir: Path = FRAMES) -> list[dict]:
    """A record for each row whose whole conversation, media tokens included, is longer than `max_length`.

    Such rows are left out, never truncated: a cut inside a video's tokens would leave media without its tokens.
    """
    rejects = []
    for row in rows:
        messages, _ = to_messages(row, fam)
        videos = load_frames(row, frames_dir)
        tokens = model_inputs(fam, processor, [messages], videos, frame_times(row, videos),
                              return_tensors="pt")["input_ids"].shape[1]
        if tokens > max_length:
            rejects.append({"id": row["id"], "reason": "over_token_budget", "tokens": tokens,
                            "max_length": max_length})
    return rejects


SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "position_ids")


def collate(examples: list[dict], pad_token_id: int, pack_length: int = 0) -> dict:
    """Right-pad the per-token tensors (labels with -100, ids with pad); concatenate media tensors along dim 0.

    With `pack_length` (train_vlm.packing), the samples are first packed into as few rows of at most that many tokens
    as fit them (`pack_rows`). A row carries `position_ids` that restart at each sample and no attention mask:
    transformers then reads the sample boundaries from the positions and keeps attention within each sample (its
    packed-sequence mask; flash-attention's varlen kernels on a GPU). Padding after a row's samples gets position 0
    at every token, so each pad token is a sequence of its own, seen by no sample. The media follow the samples in
    their packed order, so each video still meets its own placeholder tokens. The loss is the same mean over the same
    labelled tokens, so packing changes the work per step, not what a step computes."""
    if pack_length:
        rows = pack_rows([len(example["input_ids"]) for example in examples], pack_length)
        examples = [examples[i] for row in rows for i in row]
        ends = np.cumsum([len(row) for row in rows]).tolist()
        spans = list(zip([0] + ends[:-1], ends))
        examples = [{**example, "position_ids": torch.arange(len(example["input_ids"]))} for example in examples]
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if key in SEQUENCE_KEYS or key == "labels":
            if pack_length and key == "attention_mask":
                continue   # the positions say where each sample starts; a mask of ones would hide that
            if pack_length:
                values = [torch.cat(values[start:end]) for start, end in spans]
            fill = IGNORE if key == "labels" else pad_token_id if key == "input_ids" else 0
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=fill)
        else:
            as_they_are = key == "pixel_values_videos" or key == "pixel_values" and "qformer_input_ids" in examples[0]
            batch[key] = torch.cat(same_frame_count(values) if as_they_are else pad_to_common_shape(values))
    if pack_length:
        # no cache: transformers reads packed positions only when no cache is passed, and a training forward would
        # otherwise build an (unused) one
        batch["use_cache"] = False
    return batch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing (longest first, each into the first row with room; ties by
    index, so the same batch always packs the same way). A sample longer than `capacity` gets a row of its own."""
    rows, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if fits is None:
            rows.append([])
            room.append(max(capacity, lengths[index]))
            fits = len(rows) - 1
        rows[fits].append(index)
        room[fits] -= lengths[index]
    return rows


def collator(processor, model, packing: bool, max_length: int):
    """train_vlm's data collator: padded batches, or with `packing` rows of up to `max_length` tokens, which the
    model is then made to take (`take_packed_rows`)."""
    if packing:
        take_packed_rows(model)
    return functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id,
                             pack_length=max_length if packing else 0)


def check_packing(fam) -> None:
    """Stop before any work where train_vlm.packing is on and the family cannot take packed rows (its module says
    why, as CANNOT_PACK)."""
    reason = getattr(fam, "CANNOT_PACK", None)
    if reason:
        raise ValueError(f"train_vlm.packing: {fam.__name__.rsplit('.', 1)[-1]} cannot pack samples: {reason}; set "
                         f"train_vlm.packing: false")


def take_packed_rows(model):
    """Let the model take `collate`'s packed rows. Qwen's models (mrope) position each token in time, height and
    width, which only the model computes, from its vision grids; its forward does so only when no positions are
    given. This forward pre-hook computes them over each whole packed row, where every sample's ids are its own ids
    shifted by one offset, which rotary attention within the sample does not see. It puts the restarting text
    positions first, where Qwen's text model reads the packing from. Other families take the positions as they are.
    Returns the hook's handle (None where no hook is needed)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    rope = getattr(getattr(inner, "model", None), "compute_3d_position_ids", None)
    if rope is None:
        return None
    taken = set(inspect.signature(rope).parameters) - {"inputs_embeds", "attention_mask", "past_key_values"}

    def mrope_positions(module, args, kwargs):
        positions = kwargs.get("position_ids")
        packed = positions is not None and positions.dim() == 2 and kwargs.get("attention_mask") is None
        if not packed or kwargs.get("past_key_values") is not None:   # generate's calls pass a mask and a cache
            return None
        ids = rope(inputs_embeds=None, attention_mask=None, past_key_values=None,
                   **{name: kwargs.get(name) for name in taken})
        return args, {**kwargs, "position_ids": torch.cat([positions[None], ids])}

    return inner.register_forward_pre_hook(mrope_positions, with_kwargs=True)


def same_frame_count(videos: list[torch.Tensor]) -> list[torch.Tensor]:
    """`pixel_values_videos` of LLaVA-OneVision and LLaVA-NeXT-Video, and InstructBLIP-Video's `pixel_values` (its
    batches alone carry `qformer_input_ids`), are [videos, frames, 3, h, w], and their models embed every frame of
    that tensor, zero-padded ones too, which would no longer match the prompt's video tokens. (Qwen's are flat
    patches, [patches, dim], and concatenate as they are.)"""
    counts = {video.shape[1] for video in videos if video.dim() == 5}
    if len(counts) > 1:
        raise ValueError(f"videos of {sorted(counts)} frames in one batch: this family's model takes one frame count "
                         f"per batch; extract every video with the same extract.num_frames")
    return videos


def pad_to_common_shape(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad media tensors to one shape after dim 0. SmolVLM pads a sample's videos to its longest one
    ([videos, frames, 3, h, w]); across samples the frame counts differ too, and it skips all-zero frames."""
    shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
    padded = []
    for tensor in tensors:
        # F.pad takes (before, after) pairs from the last dim backwards; pad after only
        pad = [amount for size, target in zip(reversed(tensor.shape[1:]), reversed(shape))
               for amount in (0, target - size)]
        padded.append(torch.nn.functional.pad(tensor, pad) if any(pad) else tensor)
    return padded


class ManifestDataset(torch.utils.data.Dataset):
    """Manifest rows encoded on demand (in DataLoader workers) from the frame shards."""

    def __init__(self, rows, processor, fam, max_length, frames_dir=FRAMES):
        self.rows, self.processor, self.fam = rows, processor, fam
        self.max_length, self.frames_dir = max_length, frames_dir

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        return encode(row, load_frames(row, self.frames_dir), self.processor, self.fam, self.max_length)


def generation_inputs(rows: list[dict], processor, fam, frames_dir: Path = FRAMES) -> dict:
    """A left-padded batch of prompts (everything before the first answer) for `generate`, frames from the shards."""
    return prompt_inputs(rows, [load_frames(row, frames_dir) for row in rows], processor, fam)


def answerer(processor, fam, batch_size: int, rows: list[dict]):
    """`answer(model, rows)`: the model's greedy answers, as evaluate decodes them, with room for an answer twice the
    longest reference among `rows` (a longer one scores low anyway): how the VLM trainers score a generation metric
    at each evaluation."""
    tokens = 2 * max(len(processor.tokenizer(row["target"])["input_ids"]) for row in rows)
    prompts = functools.partial(generation_inputs, processor=processor, fam=fam)
    return lambda model, scored: greedy_answers(model, processor, prompts, scored, batch_size, tokens)


def prompt_inputs(rows: list[dict], videos_per_row: list[list[np.ndarray]], processor, fam) -> dict:
    """generation_inputs with each row's frames given (stages.ask samples them from a video file)."""
    conversations, videos, times = [], [], []
    for row, row_videos in zip(rows, videos_per_row):
        messages, per_message = to_messages(row, fam, include_answers=False)
        conversations.append(messages)
        frames = row_videos[:sum(per_message)]
        videos.extend(frames)
        times.extend(frame_times(row, frames))
    return model_inputs(fam, processor, conversations, videos, times, generation_prompt=True, padding=True,
                        padding_side="left", return_tensors="pt")


# The registry. Imported last: the family modules use the shared helpers above.
from stages.models.vlm import (  # noqa: E402
    instructblip_video,
    internvl,
    llava,
    llava_next_video,
    llava_onevision,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
    smolvlm,
)

FAMILIES: dict[str, Family] = {
    "llava": llava,
    "smolvlm": smolvlm,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "llava_onevision": llava_onevision,
    "llava_next_video": llava_next_video,
    "internvl": internvl,
    "instructblip_video": instructblip_video,
}
