"""The embedded default data set: moving-shapes clips, encoded as real H.264 mp4 and identical on every machine.

Every (color, shape, direction) combination is rendered `clips_per_combo` times with random size, start, speed and
background, all drawn from one seeded generator. Each clip is stored content-addressed as videos/<sha256>.mp4. Each
sample also carries a rejected caption, wrong in one attribute, for preference tuning (stages/align_vlm.py).

Same bytes on any x86-64 CPU: ffmpeg's own RGB -> YUV conversion (libswscale) rounds differently on its SIMD paths
than on its C path, so a machine with AVX-512 encoded other bytes than one with AVX2. The frames are therefore
converted here, in integer arithmetic, and handed to x264 as raw YUV 4:2:0 in the pixel format it encodes (nothing
left for swscale to do). x264 itself is told to be CPU-independent (X264_EXACT). Checked on one machine by encoding
with ffmpeg's `-cpuflags 0` and x264's `asm=0`: the same bytes (tests/test_reproducible.py).
"""
import functools
import itertools
import random
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageDraw

from stages.common.files import sha256_file

RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 220, 40),
       "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (235, 235, 235), "cyan": (40, 210, 220)}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# x264 picks faster, not bit-exact, floating-point code for its lookahead (mb-tree) on each CPU: cpu-independent
# keeps the exact one; one thread keeps the output independent of the number of cores.
X264_EXACT = ("-threads", "1", "-x264-params", "cpu-independent=1")
QUESTIONS = ["What happens in the video?", "Describe the video.", "What does the clip show?",
             "Which object moves, and where does it go?"]


def caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moves {direction}"


def swapped_caption(attributes: dict, p: dict, index: int) -> str | None:
    """A caption that is wrong in exactly one attribute, for a preference pair (the true caption is the chosen
    answer): clip `index` swaps its (index mod 3)-th attribute, or the next one that has another value, for the value
    after its own in params' list. Deterministic and free of the seeded generator, whose draws it leaves alone.
    None when every attribute has a single value."""
    names = ("color", "shape", "direction")
    for name in names[index % 3:] + names[:index % 3]:
        values = p[f"{name}s"]
        if len(values) > 1:
            swapped = dict(attributes, **{name: values[(values.index(attributes[name]) + 1) % len(values)]})
            return caption(swapped["color"], swapped["shape"], swapped["direction"])
    return None


def plan_clips(p: dict, seed: int) -> list[dict]:
    """Draw every clip's attributes and geometry from one seeded generator (the only source of randomness)."""
    rng = random.Random(seed)
    side_max = p["frame_size"]
    combos = itertools.product(p["colors"], p["shapes"], p["directions"])
    clips = []
    for (color, shape, direction), _ in itertools.product(combos, range(p["clips_per_combo"])):
        side = rng.randint(side_max // 3, 2 * side_max // 5)
        travel = rng.uniform(0.3, 0.5) * side_max           # pixels covered over the clip
        dx, dy = STEP[direction]
        # start so that the whole path stays inside the frame
        x0 = rng.uniform(max(0, -dx * travel), side_max - side - max(0, dx * travel))
        y0 = rng.uniform(max(0, -dy * travel), side_max - side - max(0, dy * travel))
        clips.append({"color": color, "shape": shape, "direction": direction, "side": side,
                      "start": (x0, y0), "velocity": (dx * travel, dy * travel),
                      "background": tuple(rng.randint(0, 70) for _ in range(3)),
                      "question": rng.choice(QUESTIONS)})
    return clips


def draw(clip: dict, side: int, t: float, seconds: float) -> np.ndarray:
    """The clip's RGB frame at time t: its shape at its place on its background, uint8 [side, side, 3]."""
    image = Image.new("RGB", (side, side), clip["background"])
    x = clip["start"][0] + clip["velocity"][0] * t / seconds
    y = clip["start"][1] + clip["velocity"][1] * t / seconds
    box, fill, edge = [x, y, x + clip["side"], y + clip["side"]], RGB[clip["color"]], clip["side"]
    pen = ImageDraw.Draw(image)
    if clip["shape"] == "circle":
        pen.ellipse(box, fill=fill)
    elif clip["shape"] == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x + edge / 2, y), (x, y + edge), (x + edge, y + edge)], fill=fill)
    return np.asarray(image)


def yuv420p(rgb: np.ndarray) -> bytes:
    """RGB uint8 [h, w, 3] (even sides) as BT.601 limited-range YUV 4:2:0 planes, in integer arithmetic only: the
    same bytes on every CPU. Chroma is the rounded mean of each 2x2 block."""
    r, g, b = (rgb[..., channel].astype(np.int32) for channel in range(3))
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128
    v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128

    def half(plane):
        return (plane[0::2, 0::2] + plane[1::2, 0::2] + plane[0::2, 1::2] + plane[1::2, 1::2] + 2) >> 2
    return b"".join(plane.astype(np.uint8).tobytes() for plane in (y, half(u), half(v)))


def render(clip: dict, path: Path, side: int, fps: int, seconds: float) -> None:
    """Encode one clip as H.264 mp4 with the ffmpeg binary of imageio-ffmpeg, fed raw YUV 4:2:0 frames."""
    if side % 2:
        raise ValueError(f"collect.frame_size must be even for YUV 4:2:0, got {side}")
    frames = b"".join(yuv420p(draw(clip, side, index / fps, seconds)) for index in range(round(seconds * fps)))
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{side}x{side}", "-r", str(fps), "-i", "-",
               "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", str(fps), *X264_EXACT, str(path)]
    result = subprocess.run(command, input=frames, capture_output=True)
    if result.returncode:
        raise RuntimeError(f"ffmpeg failed to encode {path}: {result.stderr.decode(errors='replace').strip()}")


def assign_splits(n: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    order = list(range(n))
    random.Random(seed + 1).shuffle(order)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    splits = [""] * n
    for rank, index in enumerate(order):
        splits[index] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def generate(p: dict, seed: int, videos: Path) -> list[dict]:
    """Render the moving-shapes clips into videos/ and return their samples."""
    clips = plan_clips(p, seed)
    splits = assign_splits(len(clips), p["val_fraction"], p["test_fraction"], seed)
    scratch = [videos / f"encoding-{index}.mp4" for index in range(len(clips))]
    with ProcessPoolExecutor() as pool:  # one ffmpeg process per clip: spread them over the cores
        encode = functools.partial(render, side=p["frame_size"], fps=p["fps"], seconds=p["seconds"])
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
        rejected = swapped_caption(clip, p, index)
        if rejected:   # the preference pair for align_vlm: the true caption above is the chosen answer
            samples[-1]["rejected"] = rejected
    return samples
