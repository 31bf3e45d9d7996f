"""Reading what `extract` wrote: one safetensors shard per video, inside the packs of data/frames/
(stages/data/packs.py). A manifest row names each video's shard (`videos[i].frames`, the `<sha256>.safetensors` it
was written as); data/frames/index.json says where that shard lies in the packs. The row holds the name, not the
locator, so that a change which moves bytes within the packs (a new frame size) leaves the manifest, and what
depends on it alone (train_seq2seq), as it was.

The one place where trainers and evaluators read that layout, so that a stage which only reads frames (the
text-to-video ones) depends on this module, not on the vision-language code."""
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load

from stages.data import packs

FRAMES = Path("data/frames")
INDEX = packs.INDEX         # {shard name: locator}, written by extract beside its packs


def locate(name: str, frames_dir: Path = FRAMES) -> dict:
    """The locator {pack, offset, length} of the shard `name`; PackError when the index has none."""
    path = Path(frames_dir).resolve() / INDEX
    try:
        stat = path.stat()
        locator = read_index(path, stat.st_mtime_ns, stat.st_size).get(name)
    except OSError as error:
        raise packs.PackError(f"{path}: cannot read the index of the packs: {error}") from error
    if locator is None:
        raise packs.PackError(f"{path}: no shard {name} (the manifest and the frames are not from one run)")
    return locator


@lru_cache(maxsize=4)
def read_index(path: Path, mtime_ns: int, size: int) -> dict[str, dict]:
    """index.json, read once per process and version of the file (its time and size are part of the key)."""
    return json.loads(path.read_text())


def load_shard(name: str, frames_dir: Path = FRAMES) -> dict[str, np.ndarray]:
    """One video's shard (frames, timestamps, indices and audio when extracted); a pack that fails to read is a
    PackError naming it and the member."""
    locator = locate(name, frames_dir)
    try:
        return load(packs.read(frames_dir, locator))
    except (OSError, SafetensorError) as error:
        raise packs.PackError(f"{Path(frames_dir) / locator['pack']}: cannot read {name} at offset "
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
