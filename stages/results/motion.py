"""What a generated clip shows, read by a fixed rule (no model): the colour of the moving blob and the direction it
travels, for scoring text-to-video models on the synthetic captions; a Fréchet distance between frame sets; and
strips of frames for a person to look at.

The analyser: the background is the median colour of each clip's border pixels; the blob is every pixel farther
than FOREGROUND from it (summed over R, G, B). Its colour is the palette colour nearest its mean; its direction is
the larger component of its centroid's travel from the first to the last frame that show it. Too few blob pixels, or
a travel under one pixel, names nothing (counted wrong).
"""
from pathlib import Path

import numpy as np
from PIL import Image

from stages.data.synthetic import RGB

FOREGROUND = 100    # summed |RGB - background| above which a pixel is the blob's (backgrounds are 0-70 grey-ish)
MIN_PIXELS = 4      # a frame with fewer blob pixels does not count for the track
THUMBNAIL = 8       # side of the frames the Fréchet distance compares


def analyse(clip: np.ndarray, colors: list[str]) -> tuple[str | None, str | None]:
    """(colour, direction) of the blob in uint8 `clip` [f, h, w, 3]; either is None when the clip does not show it."""
    pixels = clip.astype(np.int32)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0)
    blob = np.abs(pixels - background).sum(-1) > FOREGROUND
    if blob.sum() < MIN_PIXELS:
        return None, None
    mean = pixels[blob].mean(0)
    color = min(colors, key=lambda name: np.abs(np.array(RGB[name]) - mean).sum())
    ys, xs = np.mgrid[:clip.shape[1], :clip.shape[2]]
    track = [(xs[mask].mean(), ys[mask].mean()) for mask in blob if mask.sum() >= MIN_PIXELS]
    if len(track) < 2:
        return color, None
    dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
    if max(abs(dx), abs(dy)) < 1:
        return color, None
    if abs(dx) > abs(dy):
        return color, "right" if dx > 0 else "left"
    return color, "down" if dy > 0 else "up"


def score(clips: np.ndarray, attributes: list[dict]) -> tuple[dict, list[dict]]:
    """Colour and direction accuracy of `clips` against the asked `attributes`, and what was read from each."""
    colors = sorted({a["color"] for a in attributes})
    read = [dict(zip(("color", "direction"), analyse(clip, colors))) for clip in clips]
    accuracy = {f"{key}_accuracy": float(np.mean([r[key] == a[key] for r, a in zip(read, attributes)]))
                for key in ("color", "direction")}
    return accuracy, read


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of frames, each frame an 8x8 RGB thumbnail in
    [0, 1] (FID's formula on pixel features: no pretrained Inception network can be fetched offline)."""
    def features(clips):
        frames = clips.reshape(-1, *clips.shape[2:])
        return np.stack([np.asarray(Image.fromarray(f).resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR),
                                    dtype=np.float64).ravel() / 255 for f in frames])
    a, b = features(real), features(generated)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # trace(sqrt(A B)) = sum of sqrt(eigenvalues of sqrt(A) B sqrt(A)), all of them real and >= 0
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(0))) @ vectors.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def save_strip(clip: np.ndarray, path: Path, scale: int = 4) -> None:
    """The clip's frames side by side, enlarged `scale` times (nearest neighbour, so pixels stay visible)."""
    strip = np.concatenate(list(clip), axis=1)
    image = Image.fromarray(strip)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
