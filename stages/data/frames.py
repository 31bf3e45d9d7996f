"""Reading what `extract` wrote: one safetensors shard per video, inside the packs of data/frames/
(stages/data/packs.py), found by the manifest's `videos[i].frames` locator. The one place where trainers and
evaluators read that layout, so that a stage which only reads frames (the text-to-video ones) depends on this module,
not on the vision-language code."""
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load

from stages.data import packs

FRAMES = Path("data/frames")


def load_shard(locator: dict, frames_dir: Path = FRAMES) -> dict[str, np.ndarray]:
    """One video's shard (frames, timestamps, indices and audio when extracted); a pack that fails to read is a
    PackError naming it and the member."""
    try:
        return load(packs.read(frames_dir, locator))
    except (OSError, SafetensorError) as error:
        raise packs.PackError(f"{Path(frames_dir) / locator['pack']}: cannot read the shard at offset "
                              f"{locator['offset']}: {error}") from error


def load_frames(row: dict, frames_dir: Path = FRAMES) -> list[np.ndarray]:
    """The decoded frames of each of the row's videos, uint8 [n, h, w, 3] each."""
    frames = []
    for video in row["videos"]:
        try:
            frames.append(load_shard(video["frames"], frames_dir)["frames"])
        except packs.PackError as error:
            raise packs.PackError(f"video {video.get('sha256', '?')} of sample {row.get('id', '?')}: {error}") \
                from error
    return frames
