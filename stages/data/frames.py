"""Reading what `extract` wrote: one safetensors shard per video in data/frames/, named by the manifest's
`videos[i].frames`. The one place where trainers and evaluators read that layout, so that a stage which only reads
frames (the text-to-video ones) depends on this module, not on the vision-language code."""
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

FRAMES = Path("data/frames")


def load_frames(row: dict, frames_dir: Path = FRAMES) -> list[np.ndarray]:
    """The decoded frames of each of the row's videos, uint8 [n, h, w, 3] each, from the extract shards."""
    return [load_file(str(frames_dir / video["frames"]))["frames"] for video in row["videos"]]
