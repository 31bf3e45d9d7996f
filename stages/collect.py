"""collect: gather the samples of every entry of `collect.sources` into data/raw.

- `synthetic` (the embedded default) generates the moving-shapes video set.
- `local` reads a folder of videos and an annotation file in one of the formats of stages/data/formats.py.
- `urls` downloads a list of videos (stages/data/fetch.py); they get captions later, from `extract.caption_model`.

Synthetic clips: every (color, shape, direction) combination is rendered `clips_per_combo` times with random size,
start, speed and background, encoded by moviepy as real H.264 mp4, and stored content-addressed as
data/raw/videos/<sha256>.mp4.
data/raw/samples.jsonl holds one sample per clip: the video, a question, the caption, the text metadata the seq2seq
model learns from, and the split. Everything follows from `base.seed`, so two runs give identical bytes.
data/raw/rejects.jsonl lists every row or video of the other sources that could not be used, with its reason.
"""
import functools
import itertools
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from moviepy import VideoClip
from PIL import Image, ImageDraw

from stages.common.files import atomic_dir, sha256_file, write_jsonl
from stages.common.params import load
from stages.data import sources

OUT = Path("data/raw")
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 220, 40),
       "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (235, 235, 235), "cyan": (40, 210, 220)}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTIONS = ["What happens in the video?", "Describe the video.", "What does the clip show?",
             "Which object moves, and where does it go?"]


def caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moves {direction}"


def plan_clips(params: dict, seed: int) -> list[dict]:
    """Draw every clip's attributes and geometry from one seeded generator (the only source of randomness)."""
    rng = random.Random(seed)
    size = params["frame_size"]
    combos = itertools.product(params["colors"], params["shapes"], params["directions"])
    clips = []
    for (color, shape, direction), _ in itertools.product(combos, range(params["clips_per_combo"])):
        side = rng.randint(size // 3, 2 * size // 5)
        travel = rng.uniform(0.3, 0.5) * size           # pixels covered over the clip
        dx, dy = STEP[direction]
        # start so that the whole path stays inside the frame
        x0 = rng.uniform(max(0, -dx * travel), size - side - max(0, dx * travel))
        y0 = rng.uniform(max(0, -dy * travel), size - side - max(0, dy * travel))
        clips.append({"color": color, "shape": shape, "direction": direction, "side": side,
                      "start": (x0, y0), "velocity": (dx * travel, dy * travel),
                      "background": tuple(rng.randint(0, 70) for _ in range(3)),
                      "question": rng.choice(QUESTIONS)})
    return clips


def render(clip: dict, path: Path, size: int, fps: int, seconds: float) -> None:
    """Encode one clip as H.264 mp4 through moviepy (which drives the ffmpeg binary of imageio-ffmpeg)."""
    def frame(t):
        image = Image.new("RGB", (size, size), clip["background"])
        x = clip["start"][0] + clip["velocity"][0] * t / seconds
        y = clip["start"][1] + clip["velocity"][1] * t / seconds
        box, fill = [x, y, x + clip["side"], y + clip["side"]], RGB[clip["color"]]
        draw = ImageDraw.Draw(image)
        if clip["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif clip["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x + clip["side"] / 2, y), (x, y + clip["side"]), (x + clip["side"], y + clip["side"])],
                         fill=fill)
        return np.asarray(image)

    # one encoder thread: x264 output is then identical across machines with different core counts
    VideoClip(frame, duration=seconds).write_videofile(
        str(path), fps=fps, codec="libx264", audio=False, logger=None,
        ffmpeg_params=["-threads", "1", "-pix_fmt", "yuv420p", "-g", str(fps)])


def assign_splits(n: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    order = list(range(n))
    random.Random(seed + 1).shuffle(order)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    splits = [""] * n
    for rank, index in enumerate(order):
        splits[index] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def synthetic(p: dict, seed: int, videos: Path) -> list[dict]:
    """Render the moving-shapes clips into videos/ and return their samples."""
    clips = plan_clips(p, seed)
    splits = assign_splits(len(clips), p["val_fraction"], p["test_fraction"], seed)
    scratch = [videos / f"encoding-{index}.mp4" for index in range(len(clips))]
    with ProcessPoolExecutor() as pool:  # one ffmpeg process per clip: spread them over the cores
        encode = functools.partial(render, size=p["frame_size"], fps=p["fps"], seconds=p["seconds"])
        list(pool.map(encode, clips, scratch, chunksize=16))
    samples = []
    for index, (clip, split, encoded) in enumerate(zip(clips, splits, scratch)):
        digest = sha256_file(encoded)
        encoded.rename(videos / f"{digest}.mp4")
        tags = [clip["color"], clip["shape"], clip["direction"]]
        random.Random(f"{seed}-{index}").shuffle(tags)  # order carries no information
        samples.append({
            "id": f"synthetic-{index:05d}",
            "videos": [f"videos/{digest}.mp4"],
            "question": clip["question"],
            "caption": caption(clip["color"], clip["shape"], clip["direction"]),
            "attributes": {"color": clip["color"], "shape": clip["shape"], "direction": clip["direction"]},
            "meta": {"title": f"clip {index}", "tags": tags, "duration": p["seconds"], "fps": p["fps"],
                     "width": p["frame_size"], "height": p["frame_size"]},
            "split": split,
        })
    return samples


def main() -> None:
    # Load
    params = load("collect")
    p, seed = params["collect"], params["base"]["seed"]

    # Build
    samples, rejects = [], []
    with atomic_dir(OUT) as out:
        (out / "videos").mkdir()
        for source in p["sources"]:
            if source["kind"] == "synthetic":
                samples += synthetic(p, seed, out / "videos")
                continue
            imported, rejected = sources.import_source(source, p["download"], out / "videos")
            for sample in imported:
                if sample.get("split") not in ("train", "val", "test"):
                    sample["split"] = sources.assign_split(sample["id"], p["val_fraction"], p["test_fraction"])
            samples += imported
            rejects += rejected
        # Save
        write_jsonl(out / "samples.jsonl", samples)
        write_jsonl(out / "rejects.jsonl", rejects)
    print(f"collect: {len(samples)} samples, {len(rejects)} rejected -> {OUT}/")


if __name__ == "__main__":
    main()
