"""What every vision-language family shares: manifest rows -> chat messages -> model inputs with assistant-only
labels, and batching. What differs per family (how frames become inputs, the tiny config) lives in one module each.
"""
import importlib
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from stages.data.formats import VIDEO  # the placeholder of one video in a user turn

FAMILIES = ("llava", "smolvlm", "qwen2_vl", "qwen2_5_vl")
IGNORE = -100          # label of every position the loss must not see
FRAMES = Path("data/frames")


def family(name: str):
    if name not in FAMILIES:
        raise ValueError(f"unknown VLM family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"stages.models.vlm.{name}")


def load_frames(row: dict, frames_dir: Path = FRAMES) -> list[np.ndarray]:
    """The decoded frames of each of the row's videos, uint8 [n, h, w, 3] each, from the extract shards."""
    return [load_file(str(frames_dir / video["frames"]))["frames"] for video in row["videos"]]


def sampling_fps(row: dict) -> list[float]:
    """Frames per second at which each of the row's videos was sampled, from the timestamps `extract` recorded."""
    rates = []
    for video in row["videos"]:
        times = video.get("timestamps") or []
        span = times[-1] - times[0] if len(times) > 1 else 0
        rates.append((len(times) - 1) / span if span > 0 else 1.0)
    return rates


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


def video_inputs(frames_per_video: list, fps: list[float]) -> dict:
    """Processor keyword arguments for families with native video input: the videos as they are (uint8
    [n, h, w, 3]), already sampled by `extract`, with their sampling rate as metadata (frame times come from it)."""
    if not frames_per_video:
        return {}
    metadata = [{"fps": rate, "total_num_frames": len(video), "frames_indices": list(range(len(video)))}
                for video, rate in zip(frames_per_video, fps)]
    return {"videos": list(frames_per_video), "video_metadata": metadata, "do_sample_frames": False}


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


def _render(processor, messages, generation_prompt=False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(row: dict, videos: list[np.ndarray], processor, fam, max_length: int) -> dict:
    """Model inputs for one sample, with labels on the assistant turns only (each with its end-of-turn token).

    A turn's span is located by rendering the conversation up to it. When no media follows that point, the tokens
    after it are plain text in both the expanded and the unexpanded sequence, so they are counted from the end with
    the tokenizer alone; otherwise the prefix goes through the processor, whatever media expansion the family does.
    Either way the located tokens are checked, never assumed.
    """
    messages, per_message = to_messages(row, fam)
    text = _render(processor, messages)
    fps = sampling_fps(row)
    inputs = dict(processor(text=text, **fam.media_inputs(videos, fps), return_tensors="pt"))
    ids = inputs["input_ids"][0]
    if len(ids) > max_length:
        raise ValueError(f"sample {row['id']}: {len(ids)} tokens, above train_vlm.max_length={max_length}")
    text_ids = processor.tokenizer(text)["input_ids"]

    def position(upto: int, generation_prompt: bool) -> int:
        """Index in `ids` where the rendering of messages[:upto] ends."""
        prefix = _render(processor, messages[:upto], generation_prompt)
        seen = sum(per_message[:upto])
        if seen == len(videos):
            tail = text_ids[len(processor.tokenizer(prefix)["input_ids"]):]
            if ids[len(ids) - len(tail):].tolist() == tail:
                return len(ids) - len(tail)
        else:
            prefix_ids = processor(text=prefix, **fam.media_inputs(videos[:seen], fps[:seen]),
                                   return_tensors="pt")["input_ids"][0]
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
        media = fam.media_inputs(load_frames(row, frames_dir), sampling_fps(row))
        tokens = processor(text=_render(processor, messages), **media, return_tensors="pt")["input_ids"].shape[1]
        if tokens > max_length:
            rejects.append({"id": row["id"], "reason": "over_token_budget", "tokens": tokens,
                            "max_length": max_length})
    return rejects


SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad the per-token tensors (labels with -100, ids with pad); concatenate media tensors along dim 0."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if key in SEQUENCE_KEYS or key == "labels":
            fill = IGNORE if key == "labels" else pad_token_id if key == "input_ids" else 0
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=fill)
        else:
            batch[key] = torch.cat(pad_to_common_shape(values))
    return batch


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
    """A left-padded batch of prompts (everything before the first answer) for `generate`."""
    texts, videos, fps = [], [], []
    for row in rows:
        messages, per_message = to_messages(row, fam, include_answers=False)
        texts.append(_render(processor, messages, generation_prompt=True))
        videos.extend(load_frames(row, frames_dir)[:sum(per_message)])
        fps.extend(sampling_fps(row)[:sum(per_message)])
    return processor(text=texts, **fam.media_inputs(videos, fps), padding=True, padding_side="left",
                     return_tensors="pt")
